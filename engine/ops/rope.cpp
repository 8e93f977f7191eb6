// Rotary position embeddings: the tables (scalar, once per model) and their application
// (Highway).
// Highway kernels with dynamic dispatch; targets, helpers and numerics: engine/ops/simd-inl.h.
#include "engine/ops/rope.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/ops/rope.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// foreach_target.h re-includes this file once per target; the includes below must follow it.
#include <hwy/highway.h>

#include "engine/ops/simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kiln::ops {
namespace HWY_NAMESPACE {

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

}  // namespace HWY_NAMESPACE
}  // namespace kiln::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kiln::ops {

HWY_EXPORT(RopeHalfSplit);
HWY_EXPORT(RopeInterleaved);
HWY_EXPORT(RopeYarnInterleaved);

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

}  // namespace kiln::ops
#endif  // HWY_ONCE
