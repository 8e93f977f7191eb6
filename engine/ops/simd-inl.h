// Per-target helpers shared by the Highway kernels of engine/ops (elementwise, norms, rope,
// attention, matmul_strided). Each of those files is compiled once per x86 target (SSSE3 … AVX3)
// through foreach_target.h, and each public function picks the best target the CPU supports at
// run time. The build has no -march flags, so static dispatch would stop at the baseline (no SIMD
// beyond SSE2); dynamic dispatch gets AVX-512 on the Zen 5 machine.
//
// Numerics mirror MaxText (docs/maxtext.md §2.1–2.3, §11): every place MaxText materialises a bf16
// tensor the kernels round to bf16, using the same round-to-nearest-even as common/bf16.h
// (RoundBf16 below is bit-identical to kiln::round_to_bf16, NaN included).
//
// Included after foreach_target.h, so once per target: the guard is Highway's per-target toggle
// instead of #pragma once.
#if defined(KILN_ENGINE_OPS_SIMD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KILN_ENGINE_OPS_SIMD_INL_H_
#undef KILN_ENGINE_OPS_SIMD_INL_H_
#else
#define KILN_ENGINE_OPS_SIMD_INL_H_
#endif

#include <hwy/highway.h>

#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Largest vector of this target in floats: sizes the stack buffers the loop tails go through,
// so a tail is computed by the same vector code as the body (identical results wherever an
// element sits in the row).
constexpr size_t kMaxLanes = HWY_MAX_BYTES / sizeof(float);

// Round to the nearest bf16 (ties to even) and return it as f32: the vector form of
// kiln::round_to_bf16, bit-identical including NaN (quieted, low half cleared).
template <class D>
HWY_INLINE hn::Vec<D> RoundBf16(D d, hn::Vec<D> v) {
  const hn::RebindToUnsigned<D> du;
  const auto u = hn::BitCast(du, v);
  const auto hi_mask = hn::Set(du, 0xFFFF0000u);
  const auto lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
  const auto rounded = hn::And(hn::Add(u, hn::Add(hn::Set(du, 0x7FFFu), lsb)), hi_mask);
  const auto quiet_nan = hn::And(hn::Or(u, hn::Set(du, 0x00400000u)), hi_mask);
  return hn::IfThenElse(hn::IsNaN(v), hn::BitCast(d, quiet_nan), hn::BitCast(d, rounded));
}

// Stores v, which must already be bf16-representable (RoundBf16), as bf16 bits.
template <class D>
HWY_INLINE void StoreBf16(D /*d*/, hn::Vec<D> v, uint16_t* HWY_RESTRICT p) {
  const hn::RebindToUnsigned<D> du;
  const hn::Rebind<uint16_t, D> d16;
  hn::StoreU(hn::TruncateTo(d16, hn::ShiftRight<16>(hn::BitCast(du, v))), d16, p);
}

template <class D>
HWY_INLINE hn::Vec<D> LoadBf16(D d, const uint16_t* HWY_RESTRICT p) {
  const hn::RebindToUnsigned<D> du;
  const hn::Rebind<uint16_t, D> d16;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(d16, p))));
}

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#endif  // KILN_ENGINE_OPS_SIMD_INL_H_
