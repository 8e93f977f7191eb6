// Strided small matrix products (Highway).
// Highway kernels with dynamic dispatch; targets, helpers and numerics: engine/ops/simd-inl.h.
#include "engine/ops/matmul_strided.h"

#include <algorithm>
#include <cstring>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/matmul_strided.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/highway.h>

#include "engine/ops/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {

// Strided small products (see matmul_strided.h). Tails of `dim` that are not
// a whole vector go through a zero-padded buffer so results do not depend on where an element
// sits; a weight row is only ever read for `dim` elements.

// y[t, r] = x[t] · w[r] for four rows at a time: each row block is widened once per token from
// L1, the four dot products reduced together.
void MatmulXwt(const float* HWY_RESTRICT x, int64_t x_stride, int64_t T,
               const uint16_t* HWY_RESTRICT w, int64_t w_stride, int64_t R, int64_t dim,
               float* HWY_RESTRICT y, int64_t y_stride) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t full = dim - dim % N;
  const int64_t rem = dim - full;
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t m = std::min<int64_t>(4, R - r0);
    const uint16_t* wr[4];
    HWY_ALIGN uint16_t tail[4][kMaxLanes] = {};
    for (int64_t j = 0; j < 4; ++j) {
      wr[j] = w + (r0 + std::min(j, m - 1)) * w_stride;
      if (rem) std::memcpy(tail[j], wr[j] + full, size_t(rem) * sizeof(uint16_t));
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * x_stride;
      VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
      for (int64_t c = 0; c < full; c += N) {
        const VF xv = hn::LoadU(d, xt + c);
        a0 = hn::MulAdd(xv, LoadBf16(d, wr[0] + c), a0);
        a1 = hn::MulAdd(xv, LoadBf16(d, wr[1] + c), a1);
        a2 = hn::MulAdd(xv, LoadBf16(d, wr[2] + c), a2);
        a3 = hn::MulAdd(xv, LoadBf16(d, wr[3] + c), a3);
      }
      if (rem) {
        HWY_ALIGN float bx[kMaxLanes] = {};
        std::memcpy(bx, xt + full, size_t(rem) * sizeof(float));
        const VF xv = hn::Load(d, bx);
        a0 = hn::MulAdd(xv, LoadBf16(d, tail[0]), a0);
        a1 = hn::MulAdd(xv, LoadBf16(d, tail[1]), a1);
        a2 = hn::MulAdd(xv, LoadBf16(d, tail[2]), a2);
        a3 = hn::MulAdd(xv, LoadBf16(d, tail[3]), a3);
      }
      float* yt = y + t * y_stride + r0;
      const VF acc[4] = {a0, a1, a2, a3};
      for (int64_t j = 0; j < m; ++j) yt[j] = hn::GetLane(hn::SumOfLanes(d, acc[j]));
    }
  }
}

// y[t, :] = Σ_r x[t, r] · w[r, :]: the head dimension across lanes in blocks of up to four
// vectors (accumulators in registers), the weight rows streamed once per token and block.
void MatmulXw(const float* HWY_RESTRICT x, int64_t x_stride, int64_t T,
              const uint16_t* HWY_RESTRICT w, int64_t w_stride, int64_t R, int64_t dim,
              float* HWY_RESTRICT y, int64_t y_stride) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t full = dim - dim % N;
  const int64_t rem = dim - full;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * x_stride;
    float* yt = y + t * y_stride;
    int64_t c0 = 0;
    for (; c0 + 4 * N <= full; c0 += 4 * N) {
      VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
      const uint16_t* wr = w + c0;
      for (int64_t r = 0; r < R; ++r, wr += w_stride) {
        const VF xv = hn::Set(d, xt[r]);
        a0 = hn::MulAdd(xv, LoadBf16(d, wr), a0);
        a1 = hn::MulAdd(xv, LoadBf16(d, wr + N), a1);
        a2 = hn::MulAdd(xv, LoadBf16(d, wr + 2 * N), a2);
        a3 = hn::MulAdd(xv, LoadBf16(d, wr + 3 * N), a3);
      }
      hn::StoreU(a0, d, yt + c0);
      hn::StoreU(a1, d, yt + c0 + N);
      hn::StoreU(a2, d, yt + c0 + 2 * N);
      hn::StoreU(a3, d, yt + c0 + 3 * N);
    }
    for (; c0 < full; c0 += N) {
      VF a0 = hn::Zero(d);
      const uint16_t* wr = w + c0;
      for (int64_t r = 0; r < R; ++r, wr += w_stride)
        a0 = hn::MulAdd(hn::Set(d, xt[r]), LoadBf16(d, wr), a0);
      hn::StoreU(a0, d, yt + c0);
    }
    if (rem) {
      VF a0 = hn::Zero(d);
      const uint16_t* wr = w + full;
      HWY_ALIGN uint16_t bw[kMaxLanes] = {};
      for (int64_t r = 0; r < R; ++r, wr += w_stride) {
        std::memcpy(bw, wr, size_t(rem) * sizeof(uint16_t));
        a0 = hn::MulAdd(hn::Set(d, xt[r]), LoadBf16(d, bw), a0);
      }
      HWY_ALIGN float by[kMaxLanes];
      hn::Store(a0, d, by);
      std::memcpy(yt + full, by, size_t(rem) * sizeof(float));
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kiln::ops {

HWY_EXPORT(MatmulXwt);
HWY_EXPORT(MatmulXw);

void matmul_xwt(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
                int64_t R, int64_t dim, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(MatmulXwt)(x, x_stride, T, w, w_stride, R, dim, y, y_stride);
}

void matmul_xw(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
               int64_t R, int64_t dim, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(MatmulXw)(x, x_stride, T, w, w_stride, R, dim, y, y_stride);
}

}  // namespace kiln::ops
#endif  // HWY_ONCE
