// Element-wise and attention kernels (Highway SIMD). All activations are f32 in memory; where
// MaxText rounds to bf16 (docs/maxtext.md §11) these kernels round too, so the engine follows
// MaxText's numerics. None of them allocates.
#pragma once

#include <cstdint>
#include <vector>

#include "schema/model_config.h"

namespace kiln::ops {

// RMSNorm over each of `rows` rows of `dim` values: y = bf16(x · rsqrt(mean(x²) + eps)) · scale,
// the product rounded to bf16 (MaxText: normalised value cast to bf16, then × bf16 scale in bf16).
// Output as bf16 (matmul input) or as f32 holding bf16-representable values.
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              uint16_t* out);
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              float* out);

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

// log Σ exp(x[i]) over n ≥ 1 values (the normaliser of a row's log-softmax), vectorised; the
// same x gives the same result on any thread.
double log_sum_exp(const float* x, int64_t n);

// x[i] = bf16(x[i] * s) for n values (query scale after RoPE, qwen3).
void scale_round(float* x, int64_t n, float s);

// out[i] = bf16(silu(bf16(gate[i])) * bf16(up[i])) for n values, written as bf16 (matmul input).
void silu_mul(const float* gate, const float* up, int64_t n, uint16_t* out);

// x[i] = bf16(x[i] + bf16(y[i])) — the residual add of a projection output, both in bf16 as in
// MaxText.
void add_round(float* x, const float* y, int64_t n);

// acc[i] += w · bf16(y[i]) for n values: one MoE expert's output (rounded to bf16, MaxText's
// expert output dtype) added with its routing weight into the f32 weighted sum
// (float32_weight_sum, docs/maxtext.md §2.7).
void add_weighted_bf16(float* acc, const float* y, float w, int64_t n);

// f32 → bf16 for a row block (e.g. attention output before the out-projection).
void to_bf16(const float* x, int64_t n, uint16_t* out);

// Causal attention of one query position over a bf16 KV cache with GQA.
//   q:      [H, D] f32 (already RoPE'd and scaled; no further scaling is applied)
//   k, v:   caches for positions [0, n_ctx): element (s, kv, d) at [kv * head_stride + s * pos_stride
//           + d]. Head-major (pos_stride = D) keeps each kv head's rows one contiguous run, which
//           streams 2.3× faster than position-major rows (head_stride = D) at 512+ positions.
//   out:    [H, D] f32; query head h uses kv head h / (H / K)
//   scratch: at least attend_scratch_floats(n_ctx, H) = H · n_ctx floats (the G = H / K query
//            heads sharing a kv head are processed together so every K/V row is loaded once;
//            each head needs its own row of logits). On return scratch[h · n_ctx + s] holds the
//            unnormalised bf16 weight exp(l − max) of head h at position s.
// Logits are rounded to bf16 before the softmax as in MaxText (float32_logits: false); the
// exponentials are rounded to bf16, their sum and the weighted V sum are accumulated in f32 and
// rounded to bf16, and out = bf16(bf16(Σ e·v) / bf16(Σ e)) (docs/maxtext.md §2.2: the einsum and
// the sum of bf16 exps are bf16).
// Throws kiln::Error for n_ctx < 1, K < 1, H not a multiple of K, D < 1, pos_stride < D, or
// head_stride < D with K > 1.
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t pos_stride, int64_t head_stride, float* scratch,
            float* out);
inline int64_t attend_scratch_floats(int64_t n_ctx, int64_t H) {
  return n_ctx * H;
}

// QK-Clip calibration (kiln calibrate): raises max[h] to the largest bf16 attention logit of
// query head h over positions [0, n_ctx) — the softmax input of `attend` for the same arguments,
// i.e. MaxText's max_logits (docs/maxtext.md §3). Not on the serving path; plain loops.
void max_logits(const float* q, const uint16_t* k, int64_t n_ctx, int64_t H, int64_t K, int64_t D,
                int64_t pos_stride, int64_t head_stride, float* max);

// Small strided products for MLA's absorbed attention (engine/deepseek.cpp): per head, the query
// is mapped into the latent space through W_uk and the latent attention output back through W_uv,
// both slices of the artifact's wkv_b [Rkv, H, Dn + Dv] read in place (a row r of a head's slice
// is `dim` contiguous bf16 values at w + r · w_stride). Single-threaded (the caller spreads heads
// over threads); f32 accumulation, results NOT rounded (the caller rounds where MaxText would).
//   matmul_xwt: y[t, r] = Σ_d x[t·x_stride + d] · w[r·w_stride + d]      (y = x · Wᵀ, W [R, dim])
//   matmul_xw:  y[t, d] = Σ_r x[t·x_stride + r] · w[r·w_stride + d]      (y = x · W,  W [R, dim])
// for t < T, r < R, d < dim; y rows at y_stride. T, R, dim >= 1.
void matmul_xwt(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
                int64_t R, int64_t dim, float* y, int64_t y_stride);
void matmul_xw(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
               int64_t R, int64_t dim, float* y, int64_t y_stride);

// The Llama-3.1 frequency remap MaxText hard-codes (scale_factor 8, low_freq_factor 1,
// high_freq_factor 4, old_context_len 8192), in f32 as MaxText computes it. Exposed for tests.
float llama31_scale_frequency(float freq);

// Name of the Highway target the kernels dispatch to on this CPU (e.g. "AVX3"), for logs.
const char* kernels_target_name();

}  // namespace kiln::ops
