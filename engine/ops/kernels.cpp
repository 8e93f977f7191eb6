// Element-wise and attention kernels on Highway with dynamic dispatch: this file is compiled once
// per x86 target (SSSE3 … AVX3) through foreach_target.h, and each public function picks the best
// target the CPU supports at run time. The build has no -march flags, so static dispatch would
// stop at the baseline (no SIMD beyond SSE2); dynamic dispatch gets AVX-512 on the Zen 5 machine.
//
// Numerics mirror MaxText (docs/maxtext.md §2.1–2.3, §11): every place MaxText materialises a bf16
// tensor we round to bf16 here, using the same round-to-nearest-even as common/bf16.h (RoundBf16
// below is bit-identical to kiln::round_to_bf16, NaN included).
#include "engine/ops/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <string>
#include <type_traits>

#include "common/bf16.h"
#include "common/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

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

// ------------------------------------------------------------------------------------------------
// Element-wise kernels

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

// ------------------------------------------------------------------------------------------------
// RMSNorm

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

// ------------------------------------------------------------------------------------------------
// RoPE. Products and sums stay separate (no FMA) so results equal the plain f32 expression
// x·cos ∓ y·sin that MaxText evaluates; for HalfSplit with bf16 inputs the products are exact
// anyway.

void RopeHalfSplit(float* HWY_RESTRICT x, int64_t heads, int64_t stride, int64_t dim,
                   const float* HWY_RESTRICT cos, const float* HWY_RESTRICT sin) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t half = dim / 2;
  const auto rotate = [&](VF a, VF b, VF c, VF s, VF& o1, VF& o2) {
    o1 = RoundBf16(d, hn::Sub(hn::Mul(a, c), hn::Mul(b, s)));
    o2 = RoundBf16(d, hn::Add(hn::Mul(b, c), hn::Mul(a, s)));
  };
  for (int64_t h = 0; h < heads; ++h) {
    float* x1 = x + h * stride;
    float* x2 = x1 + half;
    int64_t i = 0;
    for (; i + N <= half; i += N) {
      VF o1, o2;
      rotate(hn::LoadU(d, x1 + i), hn::LoadU(d, x2 + i), hn::LoadU(d, cos + i),
             hn::LoadU(d, sin + i), o1, o2);
      hn::StoreU(o1, d, x1 + i);
      hn::StoreU(o2, d, x2 + i);
    }
    if (i < half) {
      const size_t rem = size_t(half - i);
      HWY_ALIGN float b1[kMaxLanes] = {}, b2[kMaxLanes] = {}, bc[kMaxLanes] = {},
                      bs[kMaxLanes] = {};
      std::memcpy(b1, x1 + i, rem * sizeof(float));
      std::memcpy(b2, x2 + i, rem * sizeof(float));
      std::memcpy(bc, cos + i, rem * sizeof(float));
      std::memcpy(bs, sin + i, rem * sizeof(float));
      VF o1, o2;
      rotate(hn::Load(d, b1), hn::Load(d, b2), hn::Load(d, bc), hn::Load(d, bs), o1, o2);
      hn::Store(o1, d, b1);
      hn::Store(o2, d, b2);
      std::memcpy(x1 + i, b1, rem * sizeof(float));
      std::memcpy(x2 + i, b2, rem * sizeof(float));
    }
  }
}

void RopeInterleaved(float* HWY_RESTRICT x, int64_t heads, int64_t stride, int64_t dim,
                     const float* HWY_RESTRICT cos, const float* HWY_RESTRICT sin) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t half = dim / 2;
  const auto rotate = [&](float* p, const float* c, const float* s) {
    VF ev, od;
    hn::LoadInterleaved2(d, p, ev, od);
    const VF cv = hn::LoadU(d, c), sv = hn::LoadU(d, s);
    const VF oe = RoundBf16(d, hn::Sub(hn::Mul(ev, cv), hn::Mul(od, sv)));
    const VF oo = RoundBf16(d, hn::Add(hn::Mul(od, cv), hn::Mul(ev, sv)));
    hn::StoreInterleaved2(oe, oo, d, p);
  };
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * stride;
    int64_t i = 0;  // pair index
    for (; i + N <= half; i += N) rotate(xh + 2 * i, cos + i, sin + i);
    if (i < half) {
      const size_t rem = size_t(half - i);
      HWY_ALIGN float bx[2 * kMaxLanes] = {}, bc[kMaxLanes] = {}, bs[kMaxLanes] = {};
      std::memcpy(bx, xh + 2 * i, 2 * rem * sizeof(float));
      std::memcpy(bc, cos + i, rem * sizeof(float));
      std::memcpy(bs, sin + i, rem * sizeof(float));
      rotate(bx, bc, bs);
      std::memcpy(xh + 2 * i, bx, 2 * rem * sizeof(float));
    }
  }
}

// YaRN with interleaved input pairs (x[2i], x[2i+1]) and concatenated output [Re | Im]
// (docs/maxtext.md §2.3c). The output slots overlap other pairs' inputs, so each head is first
// copied into a zero-padded buffer; whole vectors only (a tail is padding), so every element goes
// through the same vector code. The half-split-input YaRN variant is RopeHalfSplit with f32
// sin/cos.
void RopeYarnInterleaved(float* HWY_RESTRICT x, int64_t heads, int64_t stride, int64_t dim,
                         const float* HWY_RESTRICT cos, const float* HWY_RESTRICT sin) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t half = dim / 2;
  const int64_t padded = (half + N - 1) / N * N;  // pairs, rounded up to whole vectors
  HWY_ALIGN float in[2 * kYarnMaxHeadDim + 2 * kMaxLanes];
  HWY_ALIGN float re[kYarnMaxHeadDim / 2 + kMaxLanes];
  HWY_ALIGN float im[kYarnMaxHeadDim / 2 + kMaxLanes];
  HWY_ALIGN float c[kYarnMaxHeadDim / 2 + kMaxLanes];
  HWY_ALIGN float s[kYarnMaxHeadDim / 2 + kMaxLanes];
  std::memset(c + half, 0, size_t(padded - half) * sizeof(float));
  std::memset(s + half, 0, size_t(padded - half) * sizeof(float));
  std::memcpy(c, cos, size_t(half) * sizeof(float));
  std::memcpy(s, sin, size_t(half) * sizeof(float));
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * stride;
    std::memcpy(in, xh, size_t(dim) * sizeof(float));
    std::memset(in + dim, 0, size_t(2 * padded - dim) * sizeof(float));
    for (int64_t i = 0; i < padded; i += N) {
      VF ev, od;
      hn::LoadInterleaved2(d, in + 2 * i, ev, od);
      const VF cv = hn::Load(d, c + i), sv = hn::Load(d, s + i);
      hn::Store(RoundBf16(d, hn::Sub(hn::Mul(ev, cv), hn::Mul(od, sv))), d, re + i);
      hn::Store(RoundBf16(d, hn::Add(hn::Mul(od, cv), hn::Mul(ev, sv))), d, im + i);
    }
    std::memcpy(xh, re, size_t(half) * sizeof(float));
    std::memcpy(xh + half, im, size_t(half) * sizeof(float));
  }
}

// ------------------------------------------------------------------------------------------------
// Strided small products for MLA's absorbed attention (see kernels.h). Tails of `dim` that are not
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

// ------------------------------------------------------------------------------------------------
// Attention over the bf16 KV cache.
//
// The G query heads that share a kv head are processed together, up to kRows at a time, so each
// K/V row is loaded (and widened to f32) once per group rather than once per head.
//
// q·k runs with the head dimension across lanes. bf16 pairs are widened without shuffles: a u32
// lane holding elements (2j, 2j+1) gives element 2j by a left shift and element 2j+1 by masking
// the low half, so a K row becomes an "even" and an "odd" f32 vector; the query is
// de-interleaved once per call to match, and the dot product does not care about the order.
// Instead of one horizontal reduction per (head, position), the accumulators of four positions
// are reduced together (SumLanes4) and stored as one vector; the bf16 rounding of the logits
// happens later, 16 at a time, in the softmax's max pass.
//
// Σ w·v runs with the head dimension across lanes and the weight broadcast, on the same
// even/odd split, re-interleaved once at the end.
//
// Head dims are covered as [0, Dp) in pairs of vectors, [Dp, Dv) in single widened vectors (at
// most one unless D > kMaxPairDim), [Dv, D) in scalar code (only for head_dims that are not a
// multiple of the vector width; real models have 64 or 128).

constexpr int64_t kRows = 4;  // query heads per pass: 4 rows × 4 positions = 16 accumulators
constexpr int64_t kPos = 4;   // positions per q·k block
constexpr int64_t kMaxPairDim = 512;  // de-interleaved query buffer (on the stack) per row

struct AttnRow {
  const float* q;  // [D]
  float* w;        // [n] logits, then the bf16 exponentials
  float* out;      // [D]
  float sum;       // Σ w
};

// Widens the 2N bf16 values at p into their even and odd elements as f32.
HWY_INLINE void LoadBf16Pairs(DF d, const uint16_t* HWY_RESTRICT p, VF& even, VF& odd) {
#if HWY_TARGET == HWY_SCALAR  // one lane: the "pair" is p[0], p[1]
  even = LoadBf16(d, p);
  odd = LoadBf16(d, p + 1);
#else
  const hn::RebindToUnsigned<DF> du;
  const hn::Repartition<uint16_t, DF> d16;
  const auto u = hn::BitCast(du, hn::LoadU(d16, p));
  even = hn::BitCast(d, hn::ShiftLeft<16>(u));
  odd = hn::BitCast(d, hn::And(u, hn::Set(du, 0xFFFF0000u)));
#endif
}

#if HWY_TARGET != HWY_SCALAR
using D4 = hn::Full128<float>;

// Adds the halves of v until one 128-bit block is left.
template <class D>
HWY_INLINE hn::Vec<D4> SumBlocks(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(D()) > 4) {
    const hn::Half<D> dh;
    return SumBlocks(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    (void)d;
    return v;
  }
}

// Lane j of the result = sum of the lanes of the j-th argument.
HWY_INLINE hn::Vec<D4> SumLanes4(DF d, VF a, VF b, VF c, VF e) {
  // Per 128-bit block: transpose-and-add the four vectors so lane j holds vector j's block sum.
  const hn::Repartition<uint64_t, DF> d64;
  const VF ab = hn::Add(hn::InterleaveLower(d, a, b), hn::InterleaveUpper(d, a, b));
  const VF ce = hn::Add(hn::InterleaveLower(d, c, e), hn::InterleaveUpper(d, c, e));
  const auto ab64 = hn::BitCast(d64, ab), ce64 = hn::BitCast(d64, ce);
  const VF lo = hn::BitCast(d, hn::InterleaveLower(d64, ab64, ce64));
  const VF hi = hn::BitCast(d, hn::InterleaveUpper(d64, ab64, ce64));
  return SumBlocks(d, hn::Add(lo, hi));
}
#endif

// q·k of M query rows against the kPos keys at kp[], accumulated over the head dimension and
// added to rows[r].w[s + j] (which holds the scalar tail of the dot product when kTail) — or
// stored there when !kTail. Only the first `valid` positions are written (kFull: all kPos).
// The logits are left unrounded; SoftmaxWeights rounds them to bf16 in its first pass, 16 at a
// time instead of 4.
template <int64_t M, bool kTail, bool kFull>
HWY_INLINE void QkBlock(AttnRow* rows, const float* HWY_RESTRICT qde, const uint16_t* const* kp,
                        int64_t Dp, int64_t Dv, int64_t s, int64_t valid) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF acc[M][kPos];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) acc[r][j] = hn::Zero(d);
  }
  HWY_UNROLL(4)
  for (int64_t c = 0; c < Dp; c += 2 * N) {
    VF ke[kPos], ko[kPos];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) LoadBf16Pairs(d, kp[j] + c, ke[j], ko[j]);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF qe = hn::Load(d, qde + r * kMaxPairDim + c);
      const VF qo = hn::Load(d, qde + r * kMaxPairDim + c + N);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < kPos; ++j) {
        acc[r][j] = hn::MulAdd(qe, ke[j], acc[r][j]);
        acc[r][j] = hn::MulAdd(qo, ko[j], acc[r][j]);
      }
    }
  }
  for (int64_t c = Dp; c < Dv; c += N) {  // single widened vectors
    VF kv[kPos];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) kv[j] = LoadBf16(d, kp[j] + c);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF qv = hn::LoadU(d, rows[r].q + c);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < kPos; ++j) acc[r][j] = hn::MulAdd(qv, kv[j], acc[r][j]);
    }
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    float* w = rows[r].w + s;
#if HWY_TARGET == HWY_SCALAR
    (void)valid;
    for (int64_t j = 0; j < (kFull ? kPos : valid); ++j) {
      w[j] = (kTail ? w[j] : 0.0f) + hn::GetLane(acc[r][j]);
    }
#else
    const D4 d4;
    auto v4 = SumLanes4(d, acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    if constexpr (kFull) {
      if constexpr (kTail) v4 = hn::Add(v4, hn::LoadU(d4, w));
      hn::StoreU(v4, d4, w);
    } else {
      HWY_ALIGN float buf[kPos] = {};
      hn::Store(v4, d4, buf);
      for (int64_t j = 0; j < valid; ++j) w[j] = (kTail ? w[j] : 0.0f) + buf[j];
    }
#endif
  }
}

// Logits (unrounded) of M query rows against n cached keys, into rows[r].w.
// qde[r]: row r's query de-interleaved per 2N-chunk of [0, Dp): evens then odds.
template <int64_t M, bool kTail>
HWY_INLINE void QkLogitsImpl(AttnRow* rows, const float* HWY_RESTRICT qde, const uint16_t* k,
                             int64_t n, int64_t D, int64_t Dp, int64_t Dv, int64_t stride) {
  if constexpr (kTail) {  // head_dim not a multiple of the vector width: scalar part first
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t s = 0; s < n; ++s) {
        float dot = 0.0f;
        for (int64_t c = Dv; c < D; ++c) dot += rows[r].q[c] * bf16_to_f32(k[s * stride + c]);
        rows[r].w[s] = dot;
      }
    }
  } else {
    (void)D;
  }
  const uint16_t* kp[kPos];
  int64_t s = 0;
  for (; s + kPos <= n; s += kPos) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < kPos; ++j) kp[j] = k + (s + j) * stride;
    QkBlock<M, kTail, true>(rows, qde, kp, Dp, Dv, s, kPos);
  }
  if (s < n) {  // a short last block repeats the last position; extra results are dropped
    for (int64_t j = 0; j < kPos; ++j) kp[j] = k + std::min(s + j, n - 1) * stride;
    QkBlock<M, kTail, false>(rows, qde, kp, Dp, Dv, s, n - s);
  }
}

template <int64_t M>
HWY_INLINE void QkLogits(AttnRow* rows, const float* HWY_RESTRICT qde, const uint16_t* k, int64_t n,
                         int64_t D, int64_t Dp, int64_t Dv, int64_t stride) {
  if (D > Dv) {
    QkLogitsImpl<M, true>(rows, qde, k, n, D, Dp, Dv, stride);
  } else {
    QkLogitsImpl<M, false>(rows, qde, k, n, D, Dp, Dv, stride);
  }
}

// w ← bf16(exp(bf16(w) − max)), the logits rounded to bf16 first (MaxText's logits dtype);
// returns Σ w (f32).
HWY_INLINE float SoftmaxWeights(float* HWY_RESTRICT w, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF vmax = hn::Set(d, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const VF l = RoundBf16(d, hn::LoadU(d, w + i));
    hn::StoreU(l, d, w + i);
    vmax = hn::Max(vmax, l);
  }
  float m = hn::GetLane(hn::MaxOfLanes(d, vmax));
  for (int64_t t = i; t < n; ++t) {
    w[t] = round_to_bf16(w[t]);
    m = std::max(m, w[t]);
  }
  const VF vm = hn::Set(d, m);
  VF vsum = hn::Zero(d);
  i = 0;
  for (; i + N <= n; i += N) {
    const VF e = RoundBf16(d, hn::Exp(d, hn::Sub(hn::LoadU(d, w + i), vm)));
    hn::StoreU(e, d, w + i);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
  if (i < n) {
    // Padding far below the max gives exp = 0, so it adds nothing to the sum.
    HWY_ALIGN float buf[kMaxLanes];
    for (size_t t = 0; t < kMaxLanes; ++t) buf[t] = m - 1000.0f;
    const size_t rem = size_t(n - i);
    std::memcpy(buf, w + i, rem * sizeof(float));
    const VF e = RoundBf16(d, hn::Exp(d, hn::Sub(hn::Load(d, buf), vm)));
    hn::Store(e, d, buf);
    std::memcpy(w + i, buf, rem * sizeof(float));
    sum += hn::GetLane(hn::SumOfLanes(d, e));
  }
  return sum;
}

// out[c0, c0 + NP·2N) of M rows = Σ_s w[s] · v[s] / sum, on even/odd pairs.
template <int64_t M, int64_t NP>
HWY_INLINE void PvPairs(AttnRow* rows, const uint16_t* HWY_RESTRICT v, int64_t n, int64_t stride,
                        int64_t c0) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  VF ae[M][NP], ao[M][NP];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) ae[r][j] = ao[r][j] = hn::Zero(d);
  }
  const uint16_t* vp = v + c0;
  for (int64_t s = 0; s < n; ++s, vp += stride) {
    VF ve[NP], vo[NP];
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) LoadBf16Pairs(d, vp + j * 2 * N, ve[j], vo[j]);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) {
      const VF w = hn::Set(d, rows[r].w[s]);
      HWY_UNROLL(4)
      for (int64_t j = 0; j < NP; ++j) {
        ae[r][j] = hn::MulAdd(w, ve[j], ae[r][j]);
        ao[r][j] = hn::MulAdd(w, vo[j], ao[r][j]);
      }
    }
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    const VF sum = hn::Set(d, rows[r].sum);
    HWY_UNROLL(4)
    for (int64_t j = 0; j < NP; ++j) {
      hn::StoreInterleaved2(RoundBf16(d, hn::Div(RoundBf16(d, ae[r][j]), sum)),
                            RoundBf16(d, hn::Div(RoundBf16(d, ao[r][j]), sum)), d,
                            rows[r].out + c0 + j * 2 * N);
    }
  }
}

// out[c0, c0 + N) of M rows, one widened vector.
template <int64_t M>
HWY_INLINE void PvSingle(AttnRow* rows, const uint16_t* HWY_RESTRICT v, int64_t n, int64_t stride,
                         int64_t c0) {
  const DF d;
  VF acc[M];
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) acc[r] = hn::Zero(d);
  const uint16_t* vp = v + c0;
  for (int64_t s = 0; s < n; ++s, vp += stride) {
    const VF vv = LoadBf16(d, vp);
    HWY_UNROLL(4)
    for (int64_t r = 0; r < M; ++r) acc[r] = hn::MulAdd(hn::Set(d, rows[r].w[s]), vv, acc[r]);
  }
  HWY_UNROLL(4)
  for (int64_t r = 0; r < M; ++r) {
    hn::StoreU(RoundBf16(d, hn::Div(RoundBf16(d, acc[r]), hn::Set(d, rows[r].sum))), d,
               rows[r].out + c0);
  }
}

template <int64_t M>
HWY_NOINLINE void AttendRows(AttnRow* rows, const uint16_t* HWY_RESTRICT k,
                             const uint16_t* HWY_RESTRICT v, int64_t n, int64_t D, int64_t stride) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
#if HWY_TARGET == HWY_SCALAR
  const int64_t Dp = 0;  // one-lane vectors: no pairs
#else
  const int64_t Dp = D <= kMaxPairDim ? D - D % (2 * N) : 0;
#endif
  const int64_t Dv = D - D % N;
  HWY_ALIGN float qde[kRows * kMaxPairDim];
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t c = 0; c < Dp; c += 2 * N) {
      VF qe, qo;
      hn::LoadInterleaved2(d, rows[r].q + c, qe, qo);
      hn::Store(qe, d, qde + r * kMaxPairDim + c);
      hn::Store(qo, d, qde + r * kMaxPairDim + c + N);
    }
  }
  QkLogits<M>(rows, qde, k, n, D, Dp, Dv, stride);
  // MaxText: out = bf16(e @ V) / bf16(sum(e)), both bf16 because e is (docs/maxtext.md §2.2, §11).
  for (int64_t r = 0; r < M; ++r) rows[r].sum = round_to_bf16(SoftmaxWeights(rows[r].w, n));
  // Two pairs (4 vectors) of the head dimension per pass keep M × 4 accumulators in registers.
  int64_t c0 = 0;
  for (; c0 + 4 * N <= Dp; c0 += 4 * N) PvPairs<M, 2>(rows, v, n, stride, c0);
  if (c0 < Dp) PvPairs<M, 1>(rows, v, n, stride, c0);
  for (c0 = Dp; c0 < Dv; c0 += N) PvSingle<M>(rows, v, n, stride, c0);
  for (int64_t c = Dv; c < D; ++c) {  // head_dim not a multiple of the vector width
    for (int64_t r = 0; r < M; ++r) {
      float acc = 0.0f;
      for (int64_t s = 0; s < n; ++s) acc += rows[r].w[s] * bf16_to_f32(v[s * stride + c]);
      rows[r].out[c] = round_to_bf16(round_to_bf16(acc) / rows[r].sum);
    }
  }
}

void Attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t pos_stride, int64_t head_stride, float* scratch,
            float* out) {
  const int64_t G = H / K;
  for (int64_t kv = 0; kv < K; ++kv) {
    for (int64_t g0 = 0; g0 < G; g0 += kRows) {
      const int64_t m = std::min(kRows, G - g0);
      AttnRow rows[kRows];
      for (int64_t r = 0; r < m; ++r) {
        const int64_t h = kv * G + g0 + r;
        rows[r] = AttnRow{q + h * D, scratch + h * n_ctx, out + h * D, 0.0f};
      }
      const uint16_t* kh = k + kv * head_stride;
      const uint16_t* vh = v + kv * head_stride;
      switch (m) {
        case 4:
          AttendRows<4>(rows, kh, vh, n_ctx, D, pos_stride);
          break;
        case 3:
          AttendRows<3>(rows, kh, vh, n_ctx, D, pos_stride);
          break;
        case 2:
          AttendRows<2>(rows, kh, vh, n_ctx, D, pos_stride);
          break;
        default:
          AttendRows<1>(rows, kh, vh, n_ctx, D, pos_stride);
          break;
      }
    }
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

HWY_EXPORT(ScaleRound);
HWY_EXPORT(LogSumExp);
HWY_EXPORT(AddRound);
HWY_EXPORT(ToBf16);
HWY_EXPORT(AddWeightedBf16);
HWY_EXPORT(SiluMul);
HWY_EXPORT(RmsNormF32);
HWY_EXPORT(RmsNormBf16);
HWY_EXPORT(RopeHalfSplit);
HWY_EXPORT(RopeInterleaved);
HWY_EXPORT(RopeYarnInterleaved);
HWY_EXPORT(MatmulXwt);
HWY_EXPORT(MatmulXw);
HWY_EXPORT(Attend);
HWY_EXPORT(TargetName);

void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              uint16_t* out) {
  HWY_DYNAMIC_DISPATCH(RmsNormBf16)(x, scale, rows, dim, eps, out);
}
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              float* out) {
  HWY_DYNAMIC_DISPATCH(RmsNormF32)(x, scale, rows, dim, eps, out);
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

void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t pos_stride, int64_t head_stride, float* scratch,
            float* out) {
  if (n_ctx < 1 || K < 1 || H < K || H % K != 0 || D < 1 || pos_stride < D ||
      (K > 1 && head_stride < D)) {
    throw Error("attend: invalid shape n_ctx=" + std::to_string(n_ctx) + " H=" + std::to_string(H) +
                " K=" + std::to_string(K) + " D=" + std::to_string(D) +
                " pos_stride=" + std::to_string(pos_stride) +
                " head_stride=" + std::to_string(head_stride) +
                " (need n_ctx >= 1, H a multiple of K, strides >= D)");
  }
  HWY_DYNAMIC_DISPATCH(Attend)(q, k, v, n_ctx, H, K, D, pos_stride, head_stride, scratch, out);
}

void matmul_xwt(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
                int64_t R, int64_t dim, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(MatmulXwt)(x, x_stride, T, w, w_stride, R, dim, y, y_stride);
}

void matmul_xw(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
               int64_t R, int64_t dim, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(MatmulXw)(x, x_stride, T, w, w_stride, R, dim, y, y_stride);
}

const char* kernels_target_name() {
  return HWY_DYNAMIC_DISPATCH(TargetName)();
}

// MaxText LLaMARotaryEmbedding._apply_scaling_factor, evaluated in f32 in the same order
// (JAX promotes the Python constants to the f32 array's dtype).
float llama31_scale_frequency(float freq) {
  const float scale_factor = 8.0f;
  const float low_freq_factor = 1.0f;
  const float high_freq_factor = 4.0f;
  const float old_context_len = 8192.0f;
  const float low_freq_wavelen = old_context_len / low_freq_factor;
  const float high_freq_wavelen = old_context_len / high_freq_factor;
  const float wavelen = float(2.0 * std::numbers::pi) / freq;
  if (wavelen < high_freq_wavelen) return freq;
  if (wavelen > low_freq_wavelen) return freq / scale_factor;
  const float smooth =
      (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
  return (1.0f - smooth) * freq / scale_factor + smooth * freq;
}

Rope::Rope(RopeLayout layout, int64_t head_dim, double min_timescale, double max_timescale,
           double linear_scaling_factor, bool use_llama31_scaling, int64_t max_positions)
    : layout_(layout), head_dim_(head_dim), max_positions_(max_positions) {
  if (head_dim < 2 || head_dim % 2 != 0) {
    throw Error("RoPE: head_dim must be even and >= 2, got " + std::to_string(head_dim));
  }
  if (!(min_timescale > 0.0) || !(max_timescale > 0.0) || !std::isfinite(min_timescale) ||
      !std::isfinite(max_timescale)) {
    throw Error("RoPE: timescales must be positive and finite, got min " +
                std::to_string(min_timescale) + " max " + std::to_string(max_timescale));
  }
  if (!(linear_scaling_factor > 0.0) || !std::isfinite(linear_scaling_factor)) {
    throw Error("RoPE: linear scaling factor must be positive, got " +
                std::to_string(linear_scaling_factor));
  }
  if (max_positions < 1) {
    throw Error("RoPE: max_positions must be >= 1, got " + std::to_string(max_positions));
  }
  if (layout == RopeLayout::Yarn) {
    throw Error("RoPE: the YaRN layout needs its parameters (use the YarnParams constructor)");
  }
  if (layout != RopeLayout::HalfSplit && layout != RopeLayout::Interleaved) {
    throw Error("RoPE: unknown layout " + std::to_string(int(layout)));
  }
  const int64_t half = head_dim / 2;
  // Timescales in f32 as MaxText computes them: fraction = f32(2i) / f32(d), then
  // min · (max/min)^fraction, the Python scalars taking the array's f32 dtype. pow, sin and cos
  // are evaluated in double and rounded once, i.e. correctly rounded f32 (XLA's own f32 routines
  // may differ by an ulp, invisible after the bf16 rounding of the output).
  const float min_ts = float(min_timescale);
  const float ratio = float(max_timescale / min_timescale);
  std::vector<float> timescale(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float fraction = float(2 * i) / float(head_dim);
    float ts = min_ts * float(std::pow(double(ratio), double(fraction)));
    if (layout == RopeLayout::HalfSplit) {
      if (linear_scaling_factor != 1.0) ts = ts * float(linear_scaling_factor);
    } else if (use_llama31_scaling) {
      ts = 1.0f / llama31_scale_frequency(1.0f / ts);
    }
    timescale[size_t(i)] = ts;
  }
  cos_.resize(size_t(max_positions * half));
  sin_.resize(size_t(max_positions * half));
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) / timescale[size_t(i)];
      float c = float(std::cos(double(angle)));
      float s = float(std::sin(double(angle)));
      if (layout == RopeLayout::HalfSplit) {  // MaxText casts sin/cos to the input dtype first
        c = round_to_bf16(c);
        s = round_to_bf16(s);
      }
      cos_[size_t(p * half + i)] = c;
      sin_[size_t(p * half + i)] = s;
    }
  }
}

void yarn_correction_range(int64_t d, const YarnParams& p, double& low, double& high) {
  const auto correction_dim = [&](double n) {
    return double(d) * std::log(p.original_max_positions / (n * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(p.theta));
  };
  low = correction_dim(p.beta_fast);
  high = correction_dim(p.beta_slow);
  if (p.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(d - 1));
  if (low == high) high += 0.001;  // MaxText's _linear_ramp_factor: avoid a zero division
}

std::vector<float> yarn_inv_freq(int64_t d, const YarnParams& p) {
  double low = 0, high = 0;
  yarn_correction_range(d, p, low, high);
  const int64_t half = d / 2;
  // Each step one f32 operation, in MaxText's order (JAX turns the Python scalars into f32
  // constants); pow is evaluated in double and rounded once.
  const float theta = float(p.theta), factor = float(p.factor);
  const float flow = float(low), span = float(high - low);
  std::vector<float> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float expo = float(2 * i) / float(d);
    const float b = 1.0f / float(std::pow(double(theta), double(expo)));
    const float ramp = std::clamp((float(i) - flow) / span, 0.0f, 1.0f);
    const float mask = 1.0f - ramp;
    const float scaled = b / factor;
    const float keep = 1.0f - mask;
    const float a1 = scaled * keep;
    const float a2 = b * mask;
    f[size_t(i)] = a1 + a2;
  }
  return f;
}

Rope::Rope(const YarnParams& y, int64_t head_dim, int64_t max_positions)
    : layout_(RopeLayout::Yarn),
      head_dim_(head_dim),
      max_positions_(max_positions),
      yarn_interleave_(y.interleave) {
  if (head_dim < 2 || head_dim % 2 != 0 || head_dim > kYarnMaxHeadDim) {
    throw Error("YaRN RoPE: head_dim must be even, in [2, " + std::to_string(kYarnMaxHeadDim) +
                "], got " + std::to_string(head_dim));
  }
  if (!(y.theta > 1.0) || !(y.factor > 0.0) || !(y.original_max_positions > 0.0) ||
      !(y.beta_fast > 0.0) || !(y.beta_slow > 0.0) || !std::isfinite(y.theta) ||
      !std::isfinite(y.factor)) {
    throw Error(
        "YaRN RoPE: theta must be > 1 and factor, original_max_position_embeddings, "
        "beta_fast, beta_slow positive (got theta " +
        std::to_string(y.theta) + ", factor " + std::to_string(y.factor) + ", original " +
        std::to_string(y.original_max_positions) + ", betas " + std::to_string(y.beta_fast) + "/" +
        std::to_string(y.beta_slow) + ")");
  }
  if (max_positions < 1) {
    throw Error("YaRN RoPE: max_positions must be >= 1, got " + std::to_string(max_positions));
  }
  const std::vector<float> freq = yarn_inv_freq(head_dim, y);
  const int64_t half = head_dim / 2;
  cos_.resize(size_t(max_positions * half));
  sin_.resize(size_t(max_positions * half));
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * freq[size_t(i)];  // jnp.outer(t, freqs) in f32
      cos_[size_t(p * half + i)] = float(std::cos(double(angle)));
      sin_[size_t(p * half + i)] = float(std::sin(double(angle)));
    }
  }
}

void Rope::apply(float* x, int64_t heads, int64_t pos, int64_t stride) const {
  if (pos < 0 || pos >= max_positions_) {
    throw Error("RoPE: position " + std::to_string(pos) + " outside [0, " +
                std::to_string(max_positions_) + ")");
  }
  if (stride == 0) stride = head_dim_;
  if (stride < head_dim_) {
    throw Error("RoPE: head stride " + std::to_string(stride) + " is smaller than head_dim " +
                std::to_string(head_dim_));
  }
  const int64_t half = head_dim_ / 2;
  const float* c = cos_.data() + pos * half;
  const float* s = sin_.data() + pos * half;
  if (layout_ == RopeLayout::Interleaved) {
    HWY_DYNAMIC_DISPATCH(RopeInterleaved)(x, heads, stride, head_dim_, c, s);
  } else if (layout_ == RopeLayout::Yarn && yarn_interleave_) {
    HWY_DYNAMIC_DISPATCH(RopeYarnInterleaved)(x, heads, stride, head_dim_, c, s);
  } else {  // HalfSplit, and YaRN with (x[i], x[i + d/2]) pairs: the same rotation
    HWY_DYNAMIC_DISPATCH(RopeHalfSplit)(x, heads, stride, head_dim_, c, s);
  }
}

void max_logits(const float* q, const uint16_t* k, int64_t n_ctx, int64_t H, int64_t K, int64_t D,
                int64_t pos_stride, int64_t head_stride, float* max) {
  const int64_t G = H / K;
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    const uint16_t* kh = k + (h / G) * head_stride;
    float m = max[h];
    for (int64_t s = 0; s < n_ctx; ++s) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * bf16_to_f32(kh[s * pos_stride + d]);
      m = std::max(m, round_to_bf16(dot));
    }
    max[h] = m;
  }
}

}  // namespace kiln::ops
#endif  // HWY_ONCE
