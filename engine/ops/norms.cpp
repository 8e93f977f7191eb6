// RMSNorm (Highway).
// Highway kernels with dynamic dispatch; targets, helpers and numerics: engine/ops/simd-inl.h.
#include "engine/ops/norms.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/norms.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/highway.h>

#include "engine/ops/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {

template <class D>
HWY_INLINE hn::Vec<D> NormVec(D d, hn::Vec<D> x, hn::Vec<D> r, hn::Vec<D> scale) {
  return RoundBf16(d, hn::Mul(RoundBf16(d, hn::Mul(x, r)), scale));
}

template <class Out>
HWY_INLINE void RmsNormRows(const float* HWY_RESTRICT x, const uint16_t* HWY_RESTRICT scale,
                            int64_t rows, int64_t dim, float eps, Out* HWY_RESTRICT out) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto store = [&](VF v, Out* p) {
    if constexpr (std::is_same_v<Out, float>) {
      hn::StoreU(v, d, p);
    } else {
      StoreBf16(d, v, p);
    }
  };
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * dim;
    Out* o = out + row * dim;
    // Four accumulators hide the FMA latency; the sum order differs from a sequential loop only
    // by f32 rounding, far below the bf16 rounding that follows.
    VF a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    int64_t i = 0;
    for (; i + 4 * N <= dim; i += 4 * N) {
      const VF v0 = hn::LoadU(d, xr + i), v1 = hn::LoadU(d, xr + i + N);
      const VF v2 = hn::LoadU(d, xr + i + 2 * N), v3 = hn::LoadU(d, xr + i + 3 * N);
      a0 = hn::MulAdd(v0, v0, a0);
      a1 = hn::MulAdd(v1, v1, a1);
      a2 = hn::MulAdd(v2, v2, a2);
      a3 = hn::MulAdd(v3, v3, a3);
    }
    for (; i + N <= dim; i += N) {
      const VF v0 = hn::LoadU(d, xr + i);
      a0 = hn::MulAdd(v0, v0, a0);
    }
    float ss = hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
    for (; i < dim; ++i) ss += xr[i] * xr[i];
    const float mean = ss / float(dim);
    const VF r = hn::Set(d, 1.0f / std::sqrt(mean + eps));

    i = 0;
    for (; i + N <= dim; i += N)
      store(NormVec(d, hn::LoadU(d, xr + i), r, LoadBf16(d, scale + i)), o + i);
    if (i < dim) {
      HWY_ALIGN float bx[kMaxLanes] = {};
      HWY_ALIGN uint16_t bs[kMaxLanes] = {};
      HWY_ALIGN Out bo[kMaxLanes] = {};
      const size_t rem = size_t(dim - i);
      std::memcpy(bx, xr + i, rem * sizeof(float));
      std::memcpy(bs, scale + i, rem * sizeof(uint16_t));
      store(NormVec(d, hn::Load(d, bx), r, LoadBf16(d, bs)), bo);
      std::memcpy(o + i, bo, rem * sizeof(Out));
    }
  }
}

void RmsNormF32(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
                float* out) {
  RmsNormRows(x, scale, rows, dim, eps, out);
}
void RmsNormBf16(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
                 uint16_t* out) {
  RmsNormRows(x, scale, rows, dim, eps, out);
}

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kiln::ops {

HWY_EXPORT(RmsNormF32);
HWY_EXPORT(RmsNormBf16);

void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              uint16_t* out) {
  HWY_DYNAMIC_DISPATCH(RmsNormBf16)(x, scale, rows, dim, eps, out);
}
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              float* out) {
  HWY_DYNAMIC_DISPATCH(RmsNormF32)(x, scale, rows, dim, eps, out);
}

}  // namespace kiln::ops
#endif  // HWY_ONCE
