// RoPE and YaRN against straightforward scalar references written from the MaxText formulas
// (docs/maxtext.md §2.3, §11). Every check runs once per Highway target this CPU supports, so the
// SSSE3/SSE4/AVX2 code paths are exercised too, not only the AVX-512 one the machine dispatches to.
//
// The benchmark at the end is skipped by default: ops_tests --no-skip -tc='bench*'
#include "engine/ops/rope.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numbers>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"
#include "tests/unit/ops_test_support.h"

namespace kiln::ops {
namespace {

using namespace kiln::ops::test;

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

// ---- YaRN -------------------------------------------------------------------------------------

YarnParams deepseek_v3_yarn() {
  return YarnParams{10000.0, 40.0, 4096.0, 32.0, 1.0, true, true};
}

// docs/maxtext.md's formulas written out independently (f32 steps as MaxText evaluates them).
std::vector<float> ref_inv_freq(int64_t d, double theta, double factor, double low, double high) {
  std::vector<float> f;
  for (int64_t i = 0; i < d / 2; ++i) {
    const float b = 1.0f / float(std::pow(double(float(theta)), double(float(2 * i) / float(d))));
    float ramp = (float(i) - float(low)) / float(high - low);
    ramp = std::min(1.0f, std::max(0.0f, ramp));
    const float smooth = 1.0f - ramp;
    const float x = (b / float(factor)) * (1.0f - smooth);
    const float y = b * smooth;
    f.push_back(x + y);
  }
  return f;
}

// Rotation of one head: pairs (x[2i], x[2i+1]) or (x[i], x[i+d/2]); output [Re | Im].
std::vector<float> ref_yarn(const std::vector<float>& x, const std::vector<float>& freq,
                            int64_t pos, bool interleave) {
  const size_t half = freq.size();
  std::vector<float> out(2 * half);
  for (size_t i = 0; i < half; ++i) {
    const float ang = float(pos) * freq[i];
    const float c = float(std::cos(double(ang))), s = float(std::sin(double(ang)));
    const float re = interleave ? x[2 * i] : x[i];
    const float im = interleave ? x[2 * i + 1] : x[i + half];
    const float p1 = re * c, p2 = im * s, p3 = re * s, p4 = im * c;
    out[i] = round_to_bf16(p1 - p2);
    out[i + half] = round_to_bf16(p4 + p3);
  }
  return out;
}

TEST_CASE("YaRN correction range: docs/maxtext.md's constants, clamping and the equal case") {
  double low = 0, high = 0;
  yarn_correction_range(64, deepseek_v3_yarn(), low, high);
  CHECK(low == 10.0);  // docs/maxtext.md §2.3(c): DeepSeek-V3
  CHECK(high == 23.0);
  YarnParams kimi{50000.0, 32.0, 4096.0, 1.0, 1.0, true, true};
  yarn_correction_range(64, kimi, low, high);
  CHECK(low == 19.0);  // Kimi-K2
  CHECK(high == 20.0);
  // Without truncation and beta_fast == beta_slow the range is empty: high += 0.001.
  kimi.truncate = false;
  yarn_correction_range(64, kimi, low, high);
  const double c = 64.0 * std::log(4096.0 / (2.0 * std::numbers::pi)) / (2.0 * std::log(50000.0));
  CHECK(low == c);
  CHECK(high == c + 0.001);
  // Clamped to [0, d − 1]: a tiny original context puts low below 0, a huge one high above d − 1.
  YarnParams small = deepseek_v3_yarn();
  small.original_max_positions = 8;
  yarn_correction_range(64, small, low, high);
  CHECK(low == 0.0);
  YarnParams huge = deepseek_v3_yarn();
  huge.original_max_positions = 1e12;
  yarn_correction_range(64, huge, low, high);
  CHECK(high == 63.0);
}

TEST_CASE("YaRN frequencies: unscaled below the range, / factor above it, ramp between") {
  const YarnParams y = deepseek_v3_yarn();
  const std::vector<float> f = yarn_inv_freq(64, y);
  REQUIRE(f.size() == 32);
  CHECK(f == ref_inv_freq(64, 1e4, 40.0, 10.0, 23.0));
  const auto base = [](int64_t i) {
    return 1.0f / float(std::pow(double(1e4f), double(float(2 * i) / 64.0f)));
  };
  CHECK(f[0] == 1.0f);
  CHECK(f[9] == base(9));           // i < low: ramp 0
  CHECK(f[10] == base(10));         // i = low: ramp 0
  CHECK(f[23] == base(23) / 40.f);  // i = high: ramp 1
  CHECK(f[31] == base(31) / 40.f);
  for (int64_t i = 11; i < 23; ++i) {  // strictly between
    CHECK(f[size_t(i)] < base(i));
    CHECK(f[size_t(i)] > base(i) / 40.0f);
  }
  // Kimi-K2 (low 19, high 20): a one-step ramp.
  const YarnParams kimi{50000.0, 32.0, 4096.0, 1.0, 1.0, true, true};
  CHECK(yarn_inv_freq(64, kimi) == ref_inv_freq(64, 5e4, 32.0, 19.0, 20.0));
  // The equal case's 0.001-wide ramp.
  YarnParams eq = kimi;
  eq.truncate = false;
  double low = 0, high = 0;
  yarn_correction_range(64, eq, low, high);
  CHECK(yarn_inv_freq(64, eq) == ref_inv_freq(64, 5e4, 32.0, low, high));
}

TEST_CASE(
    "YaRN RoPE matches docs/maxtext.md: interleaved or half-split input, concatenated output") {
  std::mt19937 rng(31);
  for_each_target([&] {
    for (bool interleave : {true, false}) {
      for (int64_t d : {2, 8, 18, 64, 128}) {
        CAPTURE(interleave);
        CAPTURE(d);
        YarnParams y = deepseek_v3_yarn();
        y.interleave = interleave;
        y.original_max_positions = 64;  // the ramp lands inside d/2 for the small dims too
        const Rope rope(y, d, 700);
        CHECK(rope.head_dim() == d);
        CHECK(rope.layout() == RopeLayout::Yarn);
        const std::vector<float> freq = yarn_inv_freq(d, y);
        // Heads at a stride larger than d (MLA's q_pe inside [q_nope | q_pe]): the rest of each
        // row is left alone.
        const int64_t heads = 3, stride = d + 5;
        for (int64_t pos : {0, 1, 9, 300, 699}) {
          CAPTURE(pos);
          const auto x = random_floats(rng, size_t(heads * stride), -3.0f, 3.0f, true);
          auto got = x;
          rope.apply(got.data(), heads, pos, stride);
          for (int64_t h = 0; h < heads; ++h) {
            const std::vector<float> xh(x.begin() + h * stride, x.begin() + h * stride + d);
            const auto want = ref_yarn(xh, freq, pos, interleave);
            for (int64_t i = 0; i < d; ++i) CHECK(got[size_t(h * stride + i)] == want[size_t(i)]);
            for (int64_t i = d; i < stride; ++i)
              CHECK(got[size_t(h * stride + i)] == x[size_t(h * stride + i)]);
          }
        }
      }
    }
  });
}

TEST_CASE("YaRN RoPE at position 0 only de-interleaves; scores depend on relative position") {
  YarnParams y = deepseek_v3_yarn();
  const Rope rope(y, 8, 100);
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};
  rope.apply(x.data(), 1, 0);
  CHECK(x == std::vector<float>{1, 3, 5, 7, 2, 4, 6, 8});
  y.interleave = false;
  const Rope half(y, 8, 100);
  std::vector<float> z = {1, 2, 3, 4, 5, 6, 7, 8};
  half.apply(z.data(), 1, 0);
  CHECK(z == std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8});

  // q·k after rotation depends on the positions only through their difference (up to bf16).
  std::mt19937 rng(4);
  const Rope r64(deepseek_v3_yarn(), 64, 600);
  const auto q = random_floats(rng, 64, -1.0f, 1.0f, true),
             k = random_floats(rng, 64, -1.0f, 1.0f, true);
  const auto score = [&](int64_t pq, int64_t pk) {
    auto a = q, b = k;
    r64.apply(a.data(), 1, pq);
    r64.apply(b.data(), 1, pk);
    double s = 0;
    for (size_t i = 0; i < 64; ++i) s += double(a[i]) * double(b[i]);
    return s;
  };
  CHECK(score(10, 3) == doctest::Approx(score(500, 493)).epsilon(0.02));
  CHECK(score(7, 7) == doctest::Approx(score(0, 0)).epsilon(0.02));
}

TEST_CASE("YaRN RoPE validates its arguments") {
  const YarnParams y = deepseek_v3_yarn();
  CHECK_THROWS_AS(Rope(RopeLayout::Yarn, 64, 1.0, 1e4, 1.0, false, 10), Error);
  CHECK_THROWS_AS(Rope(y, 7, 10), Error);
  CHECK_THROWS_AS(Rope(y, 0, 10), Error);
  CHECK_THROWS_AS(Rope(y, 2 * kYarnMaxHeadDim, 10), Error);
  CHECK_THROWS_AS(Rope(y, 64, 0), Error);
  YarnParams bad = y;
  bad.theta = 1.0;
  CHECK_THROWS_AS(Rope(bad, 64, 10), Error);
  bad = y;
  bad.factor = 0.0;
  CHECK_THROWS_AS(Rope(bad, 64, 10), Error);
  bad = y;
  bad.beta_slow = -1.0;
  CHECK_THROWS_AS(Rope(bad, 64, 10), Error);
  const Rope rope(y, 8, 10);
  float x[16] = {};
  CHECK_THROWS_AS(rope.apply(x, 1, 10), Error);
  CHECK_THROWS_AS(rope.apply(x, 1, -1), Error);
  CHECK_THROWS_AS(rope.apply(x, 2, 0, 4), Error);  // stride < head_dim
}

TEST_CASE("RoPE does not allocate") {
  std::mt19937 rng(12);
  const auto x = random_floats(rng, 2051, -2.0f, 2.0f, true);
  std::vector<float> y = x;
  const Rope rope(RopeLayout::Interleaved, 64, 1.0, 5e5, 1.0, true, 1000);
  const Rope rope2(RopeLayout::HalfSplit, 64, 1.0, 1e4, 1.0, false, 1000);
  const auto run = [&] {
    rope.apply(y.data(), 32, 999);
    rope2.apply(y.data(), 32, 999);
  };
  CHECK(allocations_of(run) == 0);
}

TEST_CASE("bench: rope" * doctest::skip()) {
  std::mt19937 rng(1);
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
