// Element-wise kernels against straightforward scalar references written from the MaxText formulas
// (docs/maxtext.md §2.1, §11). Every check runs once per Highway target this CPU supports, so the
// SSSE3/SSE4/AVX2 code paths are exercised too, not only the AVX-512 one the machine dispatches to.
//
// The benchmark at the end is skipped by default: ops_tests --no-skip -tc='bench*'
#include "engine/ops/elementwise.h"

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "tests/unit/ops_test_support.h"

namespace kiln::ops {
namespace {

using namespace kiln::ops::test;

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

TEST_CASE(
    "to_bf16, round_to_bf16, scale_round and add_round match the scalar rounding bit for bit") {
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
      std::vector<float> r = x;
      round_to_bf16(r.data(), n);
      for (int64_t i = 0; i < n; ++i) CHECK(same_bits(r[size_t(i)], round_to_bf16(x[size_t(i)])));
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

TEST_CASE("add_weighted_bf16 adds w · bf16(y)") {
  std::mt19937 rng(3);
  for_each_target([&] {
    for (int64_t n : {1, 7, 16, 33, 100}) {
      std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
      std::vector<float> acc(static_cast<size_t>(n)), y(static_cast<size_t>(n));
      for (auto& v : acc) v = dist(rng);
      for (auto& v : y) v = dist(rng);  // not bf16: the kernel rounds it
      auto got = acc;
      add_weighted_bf16(got.data(), y.data(), 0.375f, n);
      for (int64_t i = 0; i < n; ++i) {
        const double want = double(acc[size_t(i)]) + 0.375 * double(round_to_bf16(y[size_t(i)]));
        CHECK(got[size_t(i)] == doctest::Approx(want).epsilon(1e-6));
      }
    }
  });
}

TEST_CASE("elementwise kernels do not allocate") {
  std::mt19937 rng(12);
  const auto x = random_floats(rng, 2051, -2.0f, 2.0f, true);
  std::vector<float> y = x;
  std::vector<uint16_t> yb(x.size());
  const auto run = [&] {
    silu_mul(x.data(), x.data(), int64_t(x.size()), yb.data());
    add_round(y.data(), x.data(), int64_t(x.size()));
    scale_round(y.data(), int64_t(x.size()), 0.5f);
    round_to_bf16(y.data(), int64_t(x.size()));
    to_bf16(y.data(), int64_t(x.size()), yb.data());
  };
  CHECK(allocations_of(run) == 0);
}

TEST_CASE("bench: elementwise" * doctest::skip()) {
  std::mt19937 rng(1);
  std::printf("target %s\n", kernels_target_name());
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
}

}  // namespace
}  // namespace kiln::ops
