// Kernels against straightforward scalar references written from the MaxText formulas
// (docs/maxtext.md §2.1–2.3, §11). Every check runs once per Highway target this CPU supports, so
// the SSSE3/SSE4/ AVX2 code paths are exercised too, not only the AVX-512 one the machine
// dispatches to.
//
// The benchmarks at the end are skipped by default: ops_tests --no-skip -tc='bench*'
#include "engine/ops/kernels.h"

#include <doctest/doctest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"

// ---- allocation counter: the kernels and Sampler::sample promise not to allocate -------------
// Replaces the global operator new for the whole ops_tests executable (sampling_test.cpp reads
// the counter through kiln_test_allocations()).
namespace {
std::atomic<uint64_t> g_allocations{0};
}
uint64_t kiln_test_allocations() {
  return g_allocations.load();
}
void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, size_t) noexcept {
  std::free(p);
}

namespace kiln::ops {
namespace {

// Runs `body` once per Highway target that is both compiled in and supported by this CPU; the
// guard restores normal dispatch even when a REQUIRE inside throws.
template <class F>
void for_each_target(F&& body) {
  struct Restore {
    ~Restore() { hwy::SetSupportedTargetsForTest(0); }
  } restore;
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    const std::string target_name = hwy::TargetName(target);
    CAPTURE(target_name);
    REQUIRE(std::string(kernels_target_name()) == target_name);
    body();
  }
}

uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

bool same_bits(float a, float b) {
  return bits(a) == bits(b);
}

bool is_bf16(float f) {
  return (bits(f) & 0xFFFFu) == 0;
}

// Distance in bf16 steps between two bf16-representable values of the same sign.
int64_t bf16_steps(float a, float b) {
  const int64_t ia = int64_t(f32_to_bf16(a) & 0x7FFF) * (std::signbit(a) ? -1 : 1);
  const int64_t ib = int64_t(f32_to_bf16(b) & 0x7FFF) * (std::signbit(b) ? -1 : 1);
  return std::abs(ia - ib);
}

std::vector<float> random_floats(std::mt19937& rng, size_t n, float lo, float hi, bool bf16) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = bf16 ? round_to_bf16(dist(rng)) : dist(rng);
  return v;
}

std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

const int64_t kSizes[] = {0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 257, 1000};

// Values that stress the rounding: ties to even both ways, just above/below ties, NaN, ±Inf,
// overflow to Inf, ±0, subnormals.
std::vector<float> rounding_cases() {
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          std::bit_cast<float>(0x3F808000u),  // tie, even below → down
                          std::bit_cast<float>(0x3F818000u),  // tie, odd below → up
                          std::bit_cast<float>(0x3F808001u),  // just above a tie → up
                          std::bit_cast<float>(0x3F807FFFu),  // just below a tie → down
                          std::bit_cast<float>(0xBF818000u),
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          std::bit_cast<float>(0x7F800001u),  // signalling NaN → quiet
                          std::numeric_limits<float>::max(),  // rounds to +Inf
                          std::bit_cast<float>(0x00008000u),  // subnormal tie
                          std::bit_cast<float>(0x00018000u),
                          1e-40f,
                          3.14159265f,
                          -2.71828183f};
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  while (v.size() < 101) v.push_back(std::bit_cast<float>(any(rng)));
  return v;
}

// ------------------------------------------------------------------------------------------------

TEST_CASE("to_bf16, scale_round and add_round match the scalar rounding bit for bit") {
  const std::vector<float> cases = rounding_cases();
  for_each_target([&] {
    for (int64_t n : kSizes) {
      CAPTURE(n);
      std::vector<float> x(static_cast<size_t>(n)), y(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        x[size_t(i)] = cases[size_t(i) % cases.size()];
        y[size_t(i)] = cases[size_t(i * 7 + 3) % cases.size()];
      }
      std::vector<uint16_t> out(size_t(n) + 1, 0xABCD);
      to_bf16(x.data(), n, out.data());
      for (int64_t i = 0; i < n; ++i) CHECK(out[size_t(i)] == f32_to_bf16(x[size_t(i)]));
      CHECK(out[size_t(n)] == 0xABCD);  // nothing written past the end

      std::vector<float> s = x;
      scale_round(s.data(), n, 0.125f);
      for (int64_t i = 0; i < n; ++i) {
        CHECK(same_bits(s[size_t(i)], round_to_bf16(x[size_t(i)] * 0.125f)));
      }
      std::vector<float> a = x;
      add_round(a.data(), y.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        CHECK(same_bits(a[size_t(i)], round_to_bf16(x[size_t(i)] + round_to_bf16(y[size_t(i)]))));
      }
    }
  });
}

TEST_CASE("scale_round rounds the product, not the factors") {
  // 1.005859375 is not bf16; × 3 = 3.017578125 → bf16 3.015625. Rounding the input first would
  // give 1.0078125 × 3 = 3.0234375, a tie that rounds to even: 3.03125.
  float x = 1.005859375f;
  scale_round(&x, 1, 3.0f);
  CHECK(x == 3.015625f);
  CHECK(round_to_bf16(round_to_bf16(1.005859375f) * 3.0f) == 3.03125f);
}

// silu_mul reference: bf16 inputs, jax.nn.silu = g · (1 / (1 + e^-g)), product rounded.
float ref_silu_mul(float gate, float up) {
  const float g = round_to_bf16(gate), u = round_to_bf16(up);
  const float sig = 1.0f / (1.0f + std::exp(-g));
  return round_to_bf16(g * sig * u);
}

TEST_CASE("silu_mul matches the scalar reference") {
  std::mt19937 rng(11);
  for_each_target([&] {
    int64_t exact = 0, total = 0;
    for (int64_t n : kSizes) {
      CAPTURE(n);
      // Not bf16 on input: the kernel must round gate and up itself.
      const auto gate = random_floats(rng, size_t(n), -12.0f, 12.0f, false);
      const auto up = random_floats(rng, size_t(n), -4.0f, 4.0f, false);
      std::vector<uint16_t> out(size_t(n) + 1, 0xABCD);
      silu_mul(gate.data(), up.data(), n, out.data());
      CHECK(out[size_t(n)] == 0xABCD);
      for (int64_t i = 0; i < n; ++i) {
        const float want = ref_silu_mul(gate[size_t(i)], up[size_t(i)]);
        const float got = bf16_to_f32(out[size_t(i)]);
        // Highway's exp is within 1 f32 ulp of libm's; that can move a result across a bf16
        // rounding boundary, never further than one bf16 step.
        CHECK(bf16_steps(got, want) <= 1);
        exact += got == want;
        ++total;
      }
    }
    CHECK(exact >= total - total / 100);
  });
  // Known values: silu(0) = 0, silu(1)·2 = 1.4621172 → bf16 1.4609375; large |g| saturates.
  const float gate[4] = {0.0f, 1.0f, 30.0f, -30.0f};
  const float up[4] = {5.0f, 2.0f, 1.0f, 1.0f};
  uint16_t out[4];
  silu_mul(gate, up, 4, out);
  CHECK(bf16_to_f32(out[0]) == 0.0f);
  CHECK(bf16_to_f32(out[1]) == 1.4609375f);
  CHECK(bf16_to_f32(out[2]) == 30.0f);
  CHECK(std::fabs(bf16_to_f32(out[3])) < 1e-11f);
}

// RMSNorm reference: f32 mean of squares (accumulated in double: the kernel's f32 sum order
// differs, and the exact value is what both approximate), y = bf16(x·r), out = bf16(y·scale).
std::vector<float> ref_rms_norm(const float* x, const uint16_t* scale, int64_t dim, float eps,
                                bool round_y) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += double(x[i]) * double(x[i]);
  const float mean = float(ss) / float(dim);
  const float r = 1.0f / std::sqrt(mean + eps);
  std::vector<float> out(static_cast<size_t>(dim));
  for (int64_t i = 0; i < dim; ++i) {
    const float y = round_y ? round_to_bf16(x[i] * r) : x[i] * r;
    out[size_t(i)] = round_to_bf16(y * bf16_to_f32(scale[i]));
  }
  return out;
}

TEST_CASE("rms_norm matches the reference in both output types") {
  std::mt19937 rng(3);
  for_each_target([&] {
    for (int64_t dim : {1, 5, 16, 17, 64, 100, 2048, 2051}) {
      CAPTURE(dim);
      const int64_t rows = 3;
      const auto x = random_floats(rng, size_t(rows * dim), -3.0f, 3.0f, true);
      const auto scale = to_bf16_bits(random_floats(rng, size_t(dim), 0.2f, 2.5f, true));
      std::vector<float> out_f(size_t(rows * dim) + 1, 42.0f);
      std::vector<uint16_t> out_b(size_t(rows * dim) + 1, 0xABCD);
      rms_norm(x.data(), scale.data(), rows, dim, 1e-5f, out_f.data());
      rms_norm(x.data(), scale.data(), rows, dim, 1e-5f, out_b.data());
      CHECK(out_f.back() == 42.0f);
      CHECK(out_b.back() == 0xABCD);
      int64_t exact = 0, differs_unrounded = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const auto want = ref_rms_norm(&x[size_t(r * dim)], scale.data(), dim, 1e-5f, true);
        const auto unrounded = ref_rms_norm(&x[size_t(r * dim)], scale.data(), dim, 1e-5f, false);
        for (int64_t i = 0; i < dim; ++i) {
          const float got = out_f[size_t(r * dim + i)];
          CHECK(is_bf16(got));
          CHECK(out_b[size_t(r * dim + i)] == f32_to_bf16(got));
          // The f32 sum of squares may differ from the double one in the last bit of r.
          CHECK(bf16_steps(got, want[size_t(i)]) <= 1);
          exact += got == want[size_t(i)];
          differs_unrounded += want[size_t(i)] != unrounded[size_t(i)];
        }
      }
      CHECK(exact >= rows * dim - (rows * dim) / 50 - 1);
      // The intermediate bf16 rounding of y is observable (so the test above can see it).
      if (dim >= 64) CHECK(differs_unrounded > 0);
    }
  });
}

TEST_CASE("rms_norm known values") {
  // x = [3, 4]: mean(x²) = 12.5, r = 1/sqrt(12.5) → y = [0.8485, 1.1314] → bf16 [0.84765625,
  // 1.1328125]; × scale 2 is exact.
  const float x[2] = {3.0f, 4.0f};
  const uint16_t scale[2] = {f32_to_bf16(2.0f), f32_to_bf16(2.0f)};
  float out[2];
  rms_norm(x, scale, 1, 2, 0.0f, out);
  CHECK(out[0] == 2.0f * 0.84765625f);
  CHECK(out[1] == 2.0f * 1.1328125f);
}

// ---- RoPE ---------------------------------------------------------------------------------------

// HalfSplit reference straight from MaxText's RotaryEmbedding (f32 timescale, bf16 sin/cos).
std::vector<float> ref_rope_half(const std::vector<float>& x, int64_t d, int64_t pos, float min_ts,
                                 float max_ts, float linear) {
  std::vector<float> out(x.size());
  const int64_t half = d / 2;
  for (size_t h = 0; h < x.size() / size_t(d); ++h) {
    const float* xh = &x[h * size_t(d)];
    float* oh = &out[h * size_t(d)];
    for (int64_t i = 0; i < half; ++i) {
      const float frac = float(2 * i) / float(d);
      float ts = min_ts * float(std::pow(double(max_ts / min_ts), double(frac)));
      if (linear != 1.0f) ts *= linear;
      const float ang = float(pos) / ts;
      const float c = round_to_bf16(float(std::cos(double(ang))));
      const float s = round_to_bf16(float(std::sin(double(ang))));
      oh[i] = round_to_bf16(xh[i] * c - xh[i + half] * s);
      oh[i + half] = round_to_bf16(xh[i + half] * c + xh[i] * s);
    }
  }
  return out;
}

// Interleaved reference from MaxText's LLaMARotaryEmbedding (f32 sin/cos).
std::vector<float> ref_rope_interleaved(const std::vector<float>& x, int64_t d, int64_t pos,
                                        float theta, bool llama31) {
  std::vector<float> out(x.size());
  for (size_t h = 0; h < x.size() / size_t(d); ++h) {
    const float* xh = &x[h * size_t(d)];
    float* oh = &out[h * size_t(d)];
    for (int64_t i = 0; i < d / 2; ++i) {
      const float frac = float(2 * i) / float(d);
      float ts = float(std::pow(double(theta), double(frac)));
      if (llama31) ts = 1.0f / llama31_scale_frequency(1.0f / ts);
      const float ang = float(pos) / ts;
      const float c = float(std::cos(double(ang))), s = float(std::sin(double(ang)));
      oh[2 * i] = round_to_bf16(xh[2 * i] * c - xh[2 * i + 1] * s);
      oh[2 * i + 1] = round_to_bf16(xh[2 * i + 1] * c + xh[2 * i] * s);
    }
  }
  return out;
}

TEST_CASE("RoPE HalfSplit matches MaxText's RotaryEmbedding") {
  std::mt19937 rng(5);
  for_each_target([&] {
    for (int64_t d : {2, 6, 34, 64, 128}) {
      for (float linear : {1.0f, 4.0f}) {
        CAPTURE(d);
        CAPTURE(linear);
        const int64_t heads = 3;
        const Rope rope(RopeLayout::HalfSplit, d, 1.0, 10000.0, linear, /*llama31 ignored*/ true,
                        600);
        CHECK(rope.head_dim() == d);
        for (int64_t pos : {0, 1, 7, 511, 599}) {
          CAPTURE(pos);
          const auto x = random_floats(rng, size_t(heads * d), -2.0f, 2.0f, true);
          auto y = x;
          rope.apply(y.data(), heads, pos);
          const auto want = ref_rope_half(x, d, pos, 1.0f, 10000.0f, linear);
          for (size_t i = 0; i < x.size(); ++i) {
            CHECK(is_bf16(y[i]));
            CHECK(y[i] == want[i]);
          }
          if (pos == 0) CHECK(y == x);  // cos 0 = 1, sin 0 = 0: identity on bf16 inputs
        }
      }
    }
  });
}

TEST_CASE("RoPE Interleaved matches MaxText's LLaMARotaryEmbedding") {
  std::mt19937 rng(6);
  for_each_target([&] {
    for (int64_t d : {2, 10, 64, 128}) {
      for (bool llama31 : {false, true}) {
        CAPTURE(d);
        CAPTURE(llama31);
        const int64_t heads = 5;
        // linear_scaling_factor is ignored by the LLaMA variant, as in MaxText.
        const Rope rope(RopeLayout::Interleaved, d, 1.0, 500000.0, 2.0, llama31, 9000);
        for (int64_t pos : {0, 1, 3, 100, 8191, 8999}) {
          CAPTURE(pos);
          const auto x = random_floats(rng, size_t(heads * d), -2.0f, 2.0f, true);
          auto y = x;
          rope.apply(y.data(), heads, pos);
          const auto want = ref_rope_interleaved(x, d, pos, 500000.0f, llama31);
          for (size_t i = 0; i < x.size(); ++i) CHECK(y[i] == want[i]);
          if (pos == 0) CHECK(y == x);
        }
      }
    }
  });
}

TEST_CASE("RoPE rotates pairs: norm preserved, right pairing") {
  std::mt19937 rng(8);
  const int64_t d = 64;
  for (RopeLayout layout : {RopeLayout::HalfSplit, RopeLayout::Interleaved}) {
    const Rope rope(layout, d, 1.0, 10000.0, 1.0, false, 100);
    const auto x = random_floats(rng, size_t(d), -2.0f, 2.0f, true);
    auto y = x;
    rope.apply(y.data(), 1, 37);
    for (int64_t i = 0; i < d / 2; ++i) {
      const int64_t a = layout == RopeLayout::HalfSplit ? i : 2 * i;
      const int64_t b = layout == RopeLayout::HalfSplit ? i + d / 2 : 2 * i + 1;
      const double before = std::hypot(x[size_t(a)], x[size_t(b)]);
      const double after = std::hypot(y[size_t(a)], y[size_t(b)]);
      CHECK(after == doctest::Approx(before).epsilon(0.01));  // bf16 sin/cos and output
    }
  }
  // Pair (0, d/2) at frequency 1 (i = 0): (1, 0) → (cos p, sin p), rounded to bf16.
  const Rope half(RopeLayout::HalfSplit, 4, 1.0, 10000.0, 1.0, false, 10);
  float v[4] = {1.0f, 0.0f, 0.0f, 0.0f};
  half.apply(v, 1, 2);
  CHECK(v[0] == round_to_bf16(float(std::cos(2.0))));
  CHECK(v[2] == round_to_bf16(float(std::sin(2.0))));
  CHECK(v[1] == 0.0f);
  CHECK(v[3] == 0.0f);
  const Rope inter(RopeLayout::Interleaved, 4, 1.0, 10000.0, 1.0, false, 10);
  float w[4] = {1.0f, 0.0f, 0.0f, 0.0f};
  inter.apply(w, 1, 2);
  CHECK(w[0] == round_to_bf16(float(std::cos(2.0))));
  CHECK(w[1] == round_to_bf16(float(std::sin(2.0))));
  CHECK(w[2] == 0.0f);
  CHECK(w[3] == 0.0f);
}

TEST_CASE("Llama-3.1 frequency remap, values by hand") {
  const double two_pi = 2.0 * std::numbers::pi;
  // wavelen < 8192/4 = 2048: unchanged.
  CHECK(llama31_scale_frequency(1.0f) == 1.0f);
  CHECK(llama31_scale_frequency(float(two_pi / 1000.0)) == float(two_pi / 1000.0));
  // wavelen > 8192: divided by 8.
  CHECK(llama31_scale_frequency(float(two_pi / 10000.0)) ==
        doctest::Approx(two_pi / 10000.0 / 8.0).epsilon(1e-6));
  CHECK(llama31_scale_frequency(1e-6f) == doctest::Approx(1e-6 / 8.0).epsilon(1e-6));
  // wavelen 4096: smooth = (8192/4096 − 1)/3 = 1/3 → f' = (2/3)·f/8 + (1/3)·f = (5/12)·f.
  const double f4096 = two_pi / 4096.0;
  CHECK(llama31_scale_frequency(float(f4096)) == doctest::Approx(f4096 * 5.0 / 12.0).epsilon(1e-6));
  // wavelen 6144: smooth = (4/3 − 1)/3 = 1/9 → f' = (8/9)/8·f + f/9 = (2/9)·f.
  const double f6144 = two_pi / 6144.0;
  CHECK(llama31_scale_frequency(float(f6144)) == doctest::Approx(f6144 * 2.0 / 9.0).epsilon(1e-6));
  // Llama-3.1-8B's table (d = 128, θ = 500000): pair 0 unchanged, pair 63 (lowest freq) / 8.
  const Rope rope(RopeLayout::Interleaved, 128, 1.0, 500000.0, 1.0, true, 5000);
  std::vector<float> x(128, 0.0f);
  x[126] = 1.0f;  // pair 63
  rope.apply(x.data(), 1, 4096);
  const double f63 = std::pow(500000.0, -126.0 / 128.0) / 8.0;
  CHECK(x[126] == round_to_bf16(float(std::cos(4096.0 * f63))));
  CHECK(x[127] == round_to_bf16(float(std::sin(4096.0 * f63))));
}

TEST_CASE("RoPE validates its arguments") {
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 63, 1.0, 1e4, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 0, 1.0, 1e4, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::Interleaved, -2, 1.0, 1e4, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 64, 0.0, 1e4, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 64, 1.0, -1.0, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 64, 1.0, 1e4, 0.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(RopeLayout::HalfSplit, 64, 1.0, 1e4, 1.0, false, 0), Error);
  CHECK_THROWS_AS(Rope(RopeLayout(7), 64, 1.0, 1e4, 1.0, false, 10), Error);
  const Rope rope(RopeLayout::HalfSplit, 8, 1.0, 1e4, 1.0, false, 10);
  float x[8] = {};
  CHECK_THROWS_AS(rope.apply(x, 1, 10), Error);
  CHECK_THROWS_AS(rope.apply(x, 1, -1), Error);
  CHECK_NOTHROW(rope.apply(x, 1, 9));
}

// ---- attention ------------------------------------------------------------------------------

// Element (s, kv, d) of the cache at kv · head_stride + s · stride + d.
struct AttnCase {
  int64_t n, H, K, D, stride, head_stride;
};

// Straight from MaxText's apply_attention_dot / compute_local_attention with default flags:
// bf16 logits, e = bf16(exp(l − max)), bf16 sum, out = bf16(bf16(Σ e·v) / sum).
std::vector<float> ref_attend(const std::vector<float>& q, const std::vector<uint16_t>& k,
                              const std::vector<uint16_t>& v, const AttnCase& c) {
  std::vector<float> out(size_t(c.H * c.D));
  std::vector<float> w(size_t(c.n));
  const int64_t G = c.H / c.K;
  for (int64_t h = 0; h < c.H; ++h) {
    const int64_t kv = h / G;
    for (int64_t s = 0; s < c.n; ++s) {
      float dot = 0.0f;
      for (int64_t d = 0; d < c.D; ++d) {
        dot += q[size_t(h * c.D + d)] * bf16_to_f32(k[size_t(kv * c.head_stride + s * c.stride + d)]);
      }
      w[size_t(s)] = round_to_bf16(dot);
    }
    const float m = *std::max_element(w.begin(), w.end());
    float sum = 0.0f;
    for (auto& e : w) {
      e = round_to_bf16(std::exp(e - m));
      sum += e;
    }
    for (int64_t d = 0; d < c.D; ++d) {
      float acc = 0.0f;
      for (int64_t s = 0; s < c.n; ++s) {
        acc += w[size_t(s)] * bf16_to_f32(v[size_t(kv * c.head_stride + s * c.stride + d)]);
      }
      out[size_t(h * c.D + d)] = round_to_bf16(round_to_bf16(acc) / round_to_bf16(sum));
    }
  }
  return out;
}

// Values on a coarse grid (multiples of 1/8, q within ±1/4·…) keep every partial sum of q·k exact
// in f32, so kernel and reference see identical bf16 logits whatever the summation order; the
// remaining difference is exp (≤ 1 f32 ulp, rarely one bf16 step of one weight) and f32 sums.
struct AttnData {
  std::vector<float> q;
  std::vector<uint16_t> k, v;
};

AttnData make_attn_data(std::mt19937& rng, const AttnCase& c) {
  std::uniform_int_distribution<int> qd(-2, 2), kd(-8, 8), vd(-64, 64);
  AttnData a;
  a.q.resize(size_t(c.H * c.D));
  for (auto& x : a.q) x = float(qd(rng)) / 8.0f;
  const size_t cache = size_t((c.K - 1) * c.head_stride + (c.n - 1) * c.stride + c.D);
  a.k.assign(cache, f32_to_bf16(std::numeric_limits<float>::quiet_NaN()));
  a.v = a.k;  // padding between rows stays NaN: reading it would poison the output
  for (int64_t s = 0; s < c.n; ++s) {
    for (int64_t kv = 0; kv < c.K; ++kv) {
      for (int64_t d = 0; d < c.D; ++d) {
        const size_t at = size_t(kv * c.head_stride + s * c.stride + d);
        a.k[at] = f32_to_bf16(float(kd(rng)) / 8.0f);
        // Each kv head's values are offset by 16·kv so a wrong GQA mapping cannot hide.
        a.v[at] = f32_to_bf16(float(vd(rng)) / 16.0f + 16.0f * float(kv));
      }
    }
  }
  return a;
}

void check_attend(std::mt19937& rng, const AttnCase& c) {
  CAPTURE(c.n);
  CAPTURE(c.H);
  CAPTURE(c.K);
  CAPTURE(c.D);
  CAPTURE(c.stride);
  CAPTURE(c.head_stride);
  const AttnData a = make_attn_data(rng, c);
  std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)) + 1, 12345.0f);
  std::vector<float> out(size_t(c.H * c.D) + 1, 12345.0f);
  attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride, scratch.data(),
         out.data());
  CHECK(scratch.back() == 12345.0f);
  CHECK(out.back() == 12345.0f);
  const auto want = ref_attend(a.q, a.k, a.v, c);
  for (int64_t i = 0; i < c.H * c.D; ++i) {
    const float kv = float(i / c.D / (c.H / c.K));
    CHECK(std::isfinite(out[size_t(i)]));
    // Values are 16·kv ± 4: a wrong kv head is off by ≥ 8; a weight one bf16 step off (exp
    // differing by an f32 ulp at a rounding boundary) moves the output by < 0.016, plus one bf16
    // step of the rounded output.
    CHECK(std::fabs(out[size_t(i)] - want[size_t(i)]) <= 0.016f + std::fabs(want[size_t(i)]) / 128);
    CHECK(std::fabs(out[size_t(i)] - 16.0f * kv) <= 4.0f);
  }
  // The weights left in scratch are bf16 values in (0, 1] with the max at exactly 1.
  for (int64_t h = 0; h < c.H; ++h) {
    const float* w = &scratch[size_t(h * c.n)];
    CHECK(*std::max_element(w, w + c.n) == 1.0f);
    for (int64_t s = 0; s < c.n; ++s) CHECK(is_bf16(w[s]));
  }
}

TEST_CASE("attend matches the reference (GQA, odd sizes, strided cache)") {
  std::mt19937 rng(9);
  for_each_target([&] {
    for (const AttnCase& c :
         {// position-major rows (head_stride = D, padded rows)
          AttnCase{1, 4, 1, 16, 16, 16}, AttnCase{2, 1, 1, 3, 3, 3}, AttnCase{3, 2, 2, 20, 40, 20},
          AttnCase{5, 6, 2, 40, 88, 40}, AttnCase{17, 12, 2, 64, 128, 64},
          AttnCase{33, 16, 2, 72, 144, 72}, AttnCase{100, 32, 8, 64, 512, 64},
          AttnCase{64, 8, 8, 128, 1024, 128}, AttnCase{257, 8, 1, 64, 80, 64},
          AttnCase{513, 32, 8, 64, 520, 64}, AttnCase{9, 4, 2, 96, 192, 96},
          AttnCase{7, 2, 1, 600, 600, 600},
          // head-major (the Llama cache: [K, capacity, D]), capacity beyond n_ctx
          AttnCase{100, 32, 8, 64, 64, 128 * 64}, AttnCase{3, 6, 2, 40, 40, 5 * 40},
          AttnCase{513, 32, 8, 64, 64, 513 * 64}, AttnCase{17, 4, 4, 20, 24, 17 * 24},
          AttnCase{1, 4, 1, 64, 64, 64}, AttnCase{3, 8, 2, 128, 128, 5 * 128},
          AttnCase{31, 8, 8, 64, 64, 40 * 64}, AttnCase{257, 24, 8, 64, 64, 300 * 64}}) {
      check_attend(rng, c);
    }
  });
}

TEST_CASE("attend with one position returns v exactly") {
  std::mt19937 rng(10);
  for_each_target([&] {
    const AttnCase c{1, 32, 8, 64, 512, 64};
    const AttnData a = make_attn_data(rng, c);
    std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
    std::vector<float> out(size_t(c.H * c.D));
    attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride, scratch.data(),
           out.data());
    for (int64_t h = 0; h < c.H; ++h) {
      for (int64_t d = 0; d < c.D; ++d) {
        CHECK(out[size_t(h * c.D + d)] == bf16_to_f32(a.v[size_t((h / 4) * c.D + d)]));
      }
    }
  });
}

TEST_CASE("attend rounds logits and weights to bf16") {
  // Position 0 has logit 0, position 1 has q·k = −2.01171875, which bf16 rounds to −2.015625;
  // its weight is bf16(exp(−2.015625)). Values 0 and 1, so out = bf16(e / bf16(1 + e)).
  const int64_t D = 2;
  const float q[D] = {1.0f, 1.0f};
  const uint16_t k[2 * D] = {0, 0, f32_to_bf16(-2.0f), f32_to_bf16(-0.01171875f)};
  const uint16_t v[2 * D] = {f32_to_bf16(0.0f), f32_to_bf16(0.0f), f32_to_bf16(1.0f),
                             f32_to_bf16(1.0f)};
  const float e = round_to_bf16(std::exp(round_to_bf16(-2.01171875f)));
  REQUIRE(round_to_bf16(-2.01171875f) == -2.015625f);
  // Skipping either rounding would give a different weight:
  REQUIRE(e != round_to_bf16(std::exp(-2.01171875f)));
  REQUIRE(e != std::exp(-2.015625f));
  for_each_target([&] {
    float scratch[2], out[D];
    attend(q, k, v, 2, 1, 1, D, D, D, scratch, out);
    CHECK(scratch[0] == 1.0f);
    CHECK(scratch[1] == e);
    const float want = round_to_bf16(e / round_to_bf16(1.0f + e));
    CHECK(out[0] == want);
    CHECK(out[1] == want);
  });
}

TEST_CASE("attend validates shapes") {
  float q[4] = {}, scratch[4] = {}, out[4] = {};
  uint16_t kv[4] = {};
  CHECK_THROWS_AS(attend(q, kv, kv, 0, 1, 1, 4, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 3, 2, 1, 2, 1, scratch, out), Error);  // H % K
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 0, 4, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 1, 0, 4, 4, scratch, out), Error);
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 1, 1, 4, 3, 4, scratch, out), Error);  // pos_stride < D
  CHECK_THROWS_AS(attend(q, kv, kv, 1, 2, 2, 2, 2, 1, scratch, out), Error);  // head_stride < D
}

TEST_CASE("kernels do not allocate") {
  std::mt19937 rng(12);
  const AttnCase c{300, 32, 8, 64, 64, 300 * 64};
  const AttnData a = make_attn_data(rng, c);
  std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
  std::vector<float> out(size_t(c.H * c.D));
  const auto x = random_floats(rng, 2051, -2.0f, 2.0f, true);
  std::vector<float> y = x, yf(x.size());
  std::vector<uint16_t> yb(x.size());
  const auto scale = to_bf16_bits(random_floats(rng, x.size(), 0.5f, 1.5f, true));
  const Rope rope(RopeLayout::Interleaved, 64, 1.0, 5e5, 1.0, true, 1000);
  const Rope rope2(RopeLayout::HalfSplit, 64, 1.0, 1e4, 1.0, false, 1000);
  // Warm-up: the first dispatch of each function picks the target (no allocation either, but
  // keep the measured region to steady-state calls).
  const auto run = [&] {
    attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride, scratch.data(),
           out.data());
    rms_norm(x.data(), scale.data(), 1, int64_t(x.size()), 1e-5f, yf.data());
    rms_norm(x.data(), scale.data(), 1, int64_t(x.size()), 1e-5f, yb.data());
    rope.apply(y.data(), 32, 999);
    rope2.apply(y.data(), 32, 999);
    silu_mul(x.data(), x.data(), int64_t(x.size()), yb.data());
    add_round(y.data(), x.data(), int64_t(x.size()));
    scale_round(y.data(), int64_t(x.size()), 0.5f);
    to_bf16(y.data(), int64_t(x.size()), yb.data());
  };
  run();
  const uint64_t before = kiln_test_allocations();
  run();
  CHECK(kiln_test_allocations() == before);
}

// ---- benchmarks (skipped by default) --------------------------------------------------------

template <class F>
double median_us(F&& f, int reps, int inner) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / inner);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

TEST_CASE("bench: kernels" * doctest::skip()) {
  std::mt19937 rng(1);
  std::printf("target %s\n", kernels_target_name());
  for (int64_t n : {1, 64, 256, 512, 2048}) {
    const AttnCase c{n, 32, 8, 64, 64, n * 64};  // head-major, as the Llama cache
    const AttnData a = make_attn_data(rng, c);
    std::vector<float> scratch(size_t(attend_scratch_floats(c.n, c.H)));
    std::vector<float> out(size_t(c.H * c.D));
    const double us = median_us(
        [&] {
          attend(a.q.data(), a.k.data(), a.v.data(), c.n, c.H, c.K, c.D, c.stride, c.head_stride, scratch.data(),
                 out.data());
        },
        15, std::max<int>(4, int(20000 / n)));
    const double flop = 4.0 * double(c.H * c.D * n);
    std::printf("attend n_ctx=%-5lld H=32 K=8 D=64: %8.2f us  (%.1f GFLOP/s)\n", (long long)n, us,
                flop / us * 1e-3);
  }
  {
    const int64_t dim = 2048;
    const auto x = random_floats(rng, size_t(dim), -2.0f, 2.0f, true);
    const auto scale = to_bf16_bits(random_floats(rng, size_t(dim), 0.5f, 1.5f, true));
    std::vector<uint16_t> ob(static_cast<size_t>(dim));
    std::printf(
        "rms_norm dim=2048 -> bf16: %.3f us\n",
        median_us([&] { rms_norm(x.data(), scale.data(), 1, dim, 1e-5f, ob.data()); }, 15, 2000));
  }
  {
    const int64_t n = 8192;
    const auto g = random_floats(rng, size_t(n), -6.0f, 6.0f, false);
    const auto u = random_floats(rng, size_t(n), -6.0f, 6.0f, false);
    std::vector<uint16_t> ob(static_cast<size_t>(n));
    std::printf("silu_mul n=8192: %.3f us\n",
                median_us([&] { silu_mul(g.data(), u.data(), n, ob.data()); }, 15, 2000));
    std::vector<float> y = g;
    std::printf("add_round n=2048: %.3f us\n",
                median_us([&] { add_round(y.data(), u.data(), 2048); }, 15, 5000));
    std::printf("to_bf16 n=2048: %.3f us\n",
                median_us([&] { to_bf16(g.data(), 2048, ob.data()); }, 15, 5000));
  }
  for (RopeLayout layout : {RopeLayout::HalfSplit, RopeLayout::Interleaved}) {
    const Rope rope(layout, 64, 1.0, 5e5, 1.0, true, 2048);
    auto x = random_floats(rng, 32 * 64, -2.0f, 2.0f, true);
    std::printf("rope %s 32 heads x 64: %.3f us\n",
                layout == RopeLayout::HalfSplit ? "half-split " : "interleaved",
                median_us([&] { rope.apply(x.data(), 32, 1000); }, 15, 5000));
  }
}

}  // namespace
}  // namespace kiln::ops
