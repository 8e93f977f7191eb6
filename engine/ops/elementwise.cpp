// Element-wise kernels on activations (Highway).
// Highway kernels with dynamic dispatch; targets, helpers and numerics: engine/ops/simd-inl.h.
#include "engine/ops/elementwise.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/elementwise.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include "engine/ops/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {

void RoundToBf16(float* HWY_RESTRICT x, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(RoundBf16(d, hn::LoadU(d, x + i)), d, x + i);
  if (i < n) {
    HWY_ALIGN float buf[kMaxLanes] = {};
    std::memcpy(buf, x + i, size_t(n - i) * sizeof(float));
    hn::Store(RoundBf16(d, hn::Load(d, buf)), d, buf);
    std::memcpy(x + i, buf, size_t(n - i) * sizeof(float));
  }
}

void ScaleRound(float* HWY_RESTRICT x, int64_t n, float s) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF vs = hn::Set(d, s);
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(RoundBf16(d, hn::Mul(hn::LoadU(d, x + i), vs)), d, x + i);
  if (i < n) {
    HWY_ALIGN float buf[kMaxLanes] = {};
    std::memcpy(buf, x + i, size_t(n - i) * sizeof(float));
    hn::Store(RoundBf16(d, hn::Mul(hn::Load(d, buf), vs)), d, buf);
    std::memcpy(x + i, buf, size_t(n - i) * sizeof(float));
  }
}

// log Σ exp(x[i]) over n values: the max, then f32 lane sums of exp(x − max) added in double.
// The result depends only on x (not on threads or batch), so a row's log-probabilities are the
// same in any batch.
double LogSumExp(const float* HWY_RESTRICT x, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF vmax = hn::Set(d, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + N <= n; i += N) vmax = hn::Max(vmax, hn::LoadU(d, x + i));
  float m = hn::GetLane(hn::MaxOfLanes(d, vmax));
  for (int64_t j = i; j < n; ++j) m = std::max(m, x[j]);
  if (!std::isfinite(m)) return double(m);
  const VF vm = hn::Set(d, m);
  VF acc = hn::Zero(d);
  i = 0;
  for (; i + N <= n; i += N) acc = hn::Add(acc, hn::Exp(d, hn::Sub(hn::LoadU(d, x + i), vm)));
  double sum = double(hn::GetLane(hn::SumOfLanes(d, acc)));
  for (int64_t j = i; j < n; ++j) sum += std::exp(double(x[j]) - double(m));
  return double(m) + std::log(sum);
}

void AddRound(float* HWY_RESTRICT x, const float* HWY_RESTRICT y, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF yb = RoundBf16(d, hn::LoadU(d, y + i));
    hn::StoreU(RoundBf16(d, hn::Add(hn::LoadU(d, x + i), yb)), d, x + i);
  }
  if (i < n) {
    HWY_ALIGN float bx[kMaxLanes] = {};
    HWY_ALIGN float by[kMaxLanes] = {};
    std::memcpy(bx, x + i, size_t(n - i) * sizeof(float));
    std::memcpy(by, y + i, size_t(n - i) * sizeof(float));
    hn::Store(RoundBf16(d, hn::Add(hn::Load(d, bx), RoundBf16(d, hn::Load(d, by)))), d, bx);
    std::memcpy(x + i, bx, size_t(n - i) * sizeof(float));
  }
}

void AddWeightedBf16(float* HWY_RESTRICT acc, const float* HWY_RESTRICT y, float w, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const VF vw = hn::Set(d, w);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF yb = RoundBf16(d, hn::LoadU(d, y + i));
    hn::StoreU(hn::MulAdd(vw, yb, hn::LoadU(d, acc + i)), d, acc + i);
  }
  if (i < n) {
    HWY_ALIGN float ba[kMaxLanes] = {};
    HWY_ALIGN float by[kMaxLanes] = {};
    std::memcpy(ba, acc + i, size_t(n - i) * sizeof(float));
    std::memcpy(by, y + i, size_t(n - i) * sizeof(float));
    hn::Store(hn::MulAdd(vw, RoundBf16(d, hn::Load(d, by)), hn::Load(d, ba)), d, ba);
    std::memcpy(acc + i, ba, size_t(n - i) * sizeof(float));
  }
}

void ToBf16(const float* HWY_RESTRICT x, int64_t n, uint16_t* HWY_RESTRICT out) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) StoreBf16(d, RoundBf16(d, hn::LoadU(d, x + i)), out + i);
  if (i < n) {
    HWY_ALIGN float bx[kMaxLanes] = {};
    HWY_ALIGN uint16_t bo[kMaxLanes] = {};
    std::memcpy(bx, x + i, size_t(n - i) * sizeof(float));
    StoreBf16(d, RoundBf16(d, hn::Load(d, bx)), bo);
    std::memcpy(out + i, bo, size_t(n - i) * sizeof(uint16_t));
  }
}

// silu(g) · u with g, u rounded to bf16 first; silu(g) = g · sigmoid(g), sigmoid = 1 / (1 + e^-g)
// (jax.nn.silu's form). exp's argument is clamped to 88 because Highway's Exp is only specified
// up to +104 and e^88 is still finite: for g < -88 the product is ~1e-36 instead of -0, which
// rounds to the same bf16 neighbourhood of zero and never matters downstream.
template <class D>
HWY_INLINE hn::Vec<D> SiluMulVec(D d, hn::Vec<D> gate, hn::Vec<D> up) {
  const auto g = RoundBf16(d, gate);
  const auto u = RoundBf16(d, up);
  const auto one = hn::Set(d, 1.0f);
  const auto e = hn::Exp(d, hn::Min(hn::Neg(g), hn::Set(d, 88.0f)));
  const auto sig = hn::Div(one, hn::Add(one, e));
  return RoundBf16(d, hn::Mul(hn::Mul(g, sig), u));
}

void SiluMul(const float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t n,
             uint16_t* HWY_RESTRICT out) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    StoreBf16(d, SiluMulVec(d, hn::LoadU(d, gate + i), hn::LoadU(d, up + i)), out + i);
  }
  if (i < n) {
    HWY_ALIGN float bg[kMaxLanes] = {};
    HWY_ALIGN float bu[kMaxLanes] = {};
    HWY_ALIGN uint16_t bo[kMaxLanes] = {};
    std::memcpy(bg, gate + i, size_t(n - i) * sizeof(float));
    std::memcpy(bu, up + i, size_t(n - i) * sizeof(float));
    StoreBf16(d, SiluMulVec(d, hn::Load(d, bg), hn::Load(d, bu)), bo);
    std::memcpy(out + i, bo, size_t(n - i) * sizeof(uint16_t));
  }
}

const char* TargetName() {
  return hwy::TargetName(HWY_TARGET);
}

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kiln::ops {

HWY_EXPORT(RoundToBf16);
HWY_EXPORT(ScaleRound);
HWY_EXPORT(LogSumExp);
HWY_EXPORT(AddRound);
HWY_EXPORT(ToBf16);
HWY_EXPORT(AddWeightedBf16);
HWY_EXPORT(SiluMul);
HWY_EXPORT(TargetName);

void round_to_bf16(float* x, int64_t n) {
  HWY_DYNAMIC_DISPATCH(RoundToBf16)(x, n);
}

void scale_round(float* x, int64_t n, float s) {
  HWY_DYNAMIC_DISPATCH(ScaleRound)(x, n, s);
}

double log_sum_exp(const float* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(LogSumExp)(x, n);
}

void silu_mul(const float* gate, const float* up, int64_t n, uint16_t* out) {
  HWY_DYNAMIC_DISPATCH(SiluMul)(gate, up, n, out);
}

void add_round(float* x, const float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AddRound)(x, y, n);
}

void add_weighted_bf16(float* acc, const float* y, float w, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AddWeightedBf16)(acc, y, w, n);
}

void to_bf16(const float* x, int64_t n, uint16_t* out) {
  HWY_DYNAMIC_DISPATCH(ToBf16)(x, n, out);
}

const char* kernels_target_name() {
  return HWY_DYNAMIC_DISPATCH(TargetName)();
}

}  // namespace kiln::ops
#endif  // HWY_ONCE
