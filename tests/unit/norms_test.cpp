// RMSNorm against straightforward scalar references written from the MaxText formulas
// (docs/maxtext.md §2.1, §11). Every check runs once per Highway target this CPU supports, so the
// SSSE3/SSE4/AVX2 code paths are exercised too, not only the AVX-512 one the machine dispatches to.
//
// The benchmark at the end is skipped by default: ops_tests --no-skip -tc='bench*'
#include "engine/ops/norms.h"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "tests/unit/ops_test_support.h"

namespace kiln::ops {
namespace {

using namespace kiln::ops::test;

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

TEST_CASE("rms_norm does not allocate") {
  std::mt19937 rng(12);
  const auto x = random_floats(rng, 2051, -2.0f, 2.0f, true);
  std::vector<float> yf(x.size());
  std::vector<uint16_t> yb(x.size());
  const auto scale = to_bf16_bits(random_floats(rng, x.size(), 0.5f, 1.5f, true));
  const auto run = [&] {
    rms_norm(x.data(), scale.data(), 1, int64_t(x.size()), 1e-5f, yf.data());
    rms_norm(x.data(), scale.data(), 1, int64_t(x.size()), 1e-5f, yb.data());
  };
  CHECK(allocations_of(run) == 0);
}

TEST_CASE("bench: rms_norm" * doctest::skip()) {
  std::mt19937 rng(1);
  {
    const int64_t dim = 2048;
    const auto x = random_floats(rng, size_t(dim), -2.0f, 2.0f, true);
    const auto scale = to_bf16_bits(random_floats(rng, size_t(dim), 0.5f, 1.5f, true));
    std::vector<uint16_t> ob(static_cast<size_t>(dim));
    std::printf(
        "rms_norm dim=2048 -> bf16: %.3f us\n",
        median_us([&] { rms_norm(x.data(), scale.data(), 1, dim, 1e-5f, ob.data()); }, 15, 2000));
  }
}

}  // namespace
}  // namespace kiln::ops
