// The strided small products of engine/ops/matmul_strided.h against a double-precision product,
// once per Highway target this CPU supports.
#include "engine/ops/matmul_strided.h"

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "tests/unit/ops_test_support.h"

namespace kiln::ops {
namespace {

using namespace kiln::ops::test;

TEST_CASE("matmul_xwt and matmul_xw match a double-precision product (strided, odd sizes)") {
  std::mt19937 rng(17);
  for_each_target([&] {
    for (int64_t dim : {1, 3, 16, 17, 40, 130}) {
      for (int64_t R : {1, 5, 64}) {
        for (int64_t T : {1, 4}) {
          CAPTURE(dim);
          CAPTURE(R);
          CAPTURE(T);
          const int64_t ws = dim + 7, xs_t = dim + 3, xs = R + 2, ys_t = R + 1, ys = dim + 2;
          const auto w = to_bf16_bits(random_floats(rng, size_t(R * ws), -1.0f, 1.0f, true));
          // y = x · Wᵀ: x [T, dim]
          const auto x1 = random_floats(rng, size_t(T * xs_t), -2.0f, 2.0f, true);
          std::vector<float> y1(size_t(T * ys_t), -7.0f);
          matmul_xwt(x1.data(), xs_t, T, w.data(), ws, R, dim, y1.data(), ys_t);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t r = 0; r < R; ++r) {
              double s = 0, mag = 0;
              for (int64_t c = 0; c < dim; ++c) {
                const double p =
                    double(x1[size_t(t * xs_t + c)]) * bf16_to_f32(w[size_t(r * ws + c)]);
                s += p;
                mag += std::fabs(p);
              }
              CHECK(std::fabs(y1[size_t(t * ys_t + r)] - s) <= 1e-5 * mag + 1e-30);
            }
            CHECK(y1[size_t(t * ys_t + R)] == -7.0f);  // nothing written past R
          }
          // y = x · W: x [T, R]
          const auto x2 = random_floats(rng, size_t(T * xs), -2.0f, 2.0f, true);
          std::vector<float> y2(size_t(T * ys), -7.0f);
          matmul_xw(x2.data(), xs, T, w.data(), ws, R, dim, y2.data(), ys);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t c = 0; c < dim; ++c) {
              double s = 0, mag = 0;
              for (int64_t r = 0; r < R; ++r) {
                const double p =
                    double(x2[size_t(t * xs + r)]) * bf16_to_f32(w[size_t(r * ws + c)]);
                s += p;
                mag += std::fabs(p);
              }
              CHECK(std::fabs(y2[size_t(t * ys + c)] - s) <= 1e-5 * mag + 1e-30);
            }
            CHECK(y2[size_t(t * ys + dim)] == -7.0f);
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace kiln::ops
