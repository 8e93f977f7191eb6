// Rotary position embeddings (RoPE, YaRN) as MaxText applies them, on f32 activations with the
// result rounded to bf16 (docs/maxtext.md §2.3, §11). apply() does not allocate.
#pragma once

#include <cstdint>
#include <vector>

#include "schema/model_config.h"

namespace kiln::ops {

// YaRN parameters (MaxText YarnRotaryEmbedding, docs/maxtext.md §2.3c; DeepSeek V2/V3, Kimi K2).
struct YarnParams {
  double theta = 10000.0;                  // rope_max_timescale
  double factor = 40.0;                    // rope_factor
  double original_max_positions = 4096.0;  // original_max_position_embeddings
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool interleave = true;  // input pairs (x[2i], x[2i+1]); false: (x[i], x[i + d/2])
  bool truncate = true;    // floor/ceil the correction range
};

// Largest rotary dim the YaRN kernel handles (it rotates a head through a stack buffer).
inline constexpr int64_t kYarnMaxHeadDim = 1024;

// The YaRN correction range (low, high) for rotary dim d, exactly as docs/maxtext.md §2.3(c):
// correction dim c(n) = d·ln(orig / (n·2π)) / (2·ln θ) in f64; low = floor(c(beta_fast)), high =
// ceil(c(beta_slow)) when truncate; clamped to [0, d − 1]; high += 0.001 if low == high.
void yarn_correction_range(int64_t d, const YarnParams& p, double& low, double& high);
// The YaRN inverse frequencies f_i, i ∈ [0, d/2), in f32 as MaxText computes them:
// b_i = 1 / θ^(f32(2i)/f32(d)); ramp_i = clip((f32(i) − f32(low)) / f32(high − low), 0, 1);
// mask_i = 1 − ramp_i; f_i = (b_i / factor)·(1 − mask_i) + b_i·mask_i (every step an f32 op).
std::vector<float> yarn_inv_freq(int64_t d, const YarnParams& p);

// Rotary position embedding, precomputed once per model for positions [0, max_positions).
//   HalfSplit   (MaxText RotaryEmbedding): dims i and i + d/2 form a pair; timescale
//               min·(max/min)^(2i/d)·linear_scaling_factor; sin/cos rounded to bf16.
//               use_llama31_scaling is ignored (MaxText's default RoPE has no such remap).
//   Interleaved (MaxText LLaMARotaryEmbedding): pairs (2i, 2i+1), optional Llama-3.1 frequency
//               remap; sin/cos stay f32. linear_scaling_factor is ignored, as in MaxText.
//   Yarn        (MaxText YarnRotaryEmbedding, second constructor): frequencies yarn_inv_freq,
//               angle f32(pos)·f_i in f32, cos/sin in f32 (MaxText's complex64 table); input
//               pairs (x[2i], x[2i+1]) when interleave, else (x[i], x[i + d/2]); the output is
//               always CONCATENATED: out[i] = Re, out[i + d/2] = Im of x_pair · e^(i·angle).
//               The rotation is the complex64 product in f32 (re·cos − im·sin, re·sin + im·cos,
//               no FMA) and its result is rounded to bf16 (MaxText casts the output back to the
//               activation dtype). No amplitude scaling: rope_attention_scaling is false, the
//               mscale lives in the softmax scale (docs/maxtext.md §2.5). Only sin/cos tables and
//               the output are rounded — as in MaxText and tests/reference/deepseek_ref.py.
// Throws kiln::Error for an odd or non-positive head_dim, non-positive timescales or scaling
// factor, or max_positions < 1 (Yarn: also head_dim > 1024, non-positive theta, factor,
// original_max_positions or betas). apply() throws for pos outside [0, max_positions).
class Rope {
 public:
  Rope(RopeLayout layout, int64_t head_dim, double min_timescale, double max_timescale,
       double linear_scaling_factor, bool use_llama31_scaling, int64_t max_positions);
  Rope(const YarnParams& yarn, int64_t head_dim, int64_t max_positions);
  // Rotates `heads` vectors of head_dim values in place for position `pos`, rounding the result
  // to bf16 (MaxText's RoPE output dtype). Head h starts at x[h * stride]; stride 0 means
  // head_dim (contiguous heads). A larger stride rotates a slice of each row, e.g. MLA's q_pe
  // inside [q_nope | q_pe] heads.
  void apply(float* x, int64_t heads, int64_t pos, int64_t stride = 0) const;
  int64_t head_dim() const { return head_dim_; }
  RopeLayout layout() const { return layout_; }

 private:
  RopeLayout layout_;
  int64_t head_dim_;
  int64_t max_positions_;
  bool yarn_interleave_ = false;
  std::vector<float> cos_, sin_;  // [max_positions, head_dim / 2]
};

// The Llama-3.1 frequency remap MaxText hard-codes (scale_factor 8, low_freq_factor 1,
// high_freq_factor 4, old_context_len 8192), in f32 as MaxText computes it. Exposed for tests.
float llama31_scale_frequency(float freq);

}  // namespace kiln::ops
