// Element-wise and attention kernels (Highway SIMD). All activations are f32 in memory; where
// MaxText rounds to bf16 (spec §11) these kernels round too, so the engine follows MaxText's
// numerics. None of them allocates.
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

// Rotary position embedding, precomputed once per model for positions [0, max_positions).
//   HalfSplit   (MaxText RotaryEmbedding): dims i and i + d/2 form a pair; timescale
//               min·(max/min)^(2i/d)·linear_scaling_factor; sin/cos rounded to bf16.
//               use_llama31_scaling is ignored (MaxText's default RoPE has no such remap).
//   Interleaved (MaxText LLaMARotaryEmbedding): pairs (2i, 2i+1), optional Llama-3.1 frequency
//               remap; sin/cos stay f32. linear_scaling_factor is ignored, as in MaxText.
// Throws kiln::Error for an odd or non-positive head_dim, non-positive timescales or scaling
// factor, or max_positions < 1. apply() throws for pos outside [0, max_positions).
class Rope {
 public:
  Rope(RopeLayout layout, int64_t head_dim, double min_timescale, double max_timescale,
       double linear_scaling_factor, bool use_llama31_scaling, int64_t max_positions);
  // Rotates `heads` vectors of head_dim values at x[h * head_dim] in place for position `pos`,
  // rounding the result to bf16 (MaxText's RoPE output dtype).
  void apply(float* x, int64_t heads, int64_t pos) const;
  int64_t head_dim() const { return head_dim_; }

 private:
  RopeLayout layout_;
  int64_t head_dim_;
  int64_t max_positions_;
  std::vector<float> cos_, sin_;  // [max_positions, head_dim / 2]
};

// x[i] = bf16(x[i] * s) for n values (query scale after RoPE, qwen3).
void scale_round(float* x, int64_t n, float s);

// out[i] = bf16(silu(bf16(gate[i])) * bf16(up[i])) for n values, written as bf16 (matmul input).
void silu_mul(const float* gate, const float* up, int64_t n, uint16_t* out);

// x[i] = bf16(x[i] + bf16(y[i])) — the residual add of a projection output, both in bf16 as in
// MaxText.
void add_round(float* x, const float* y, int64_t n);

// f32 → bf16 for a row block (e.g. attention output before the out-projection).
void to_bf16(const float* x, int64_t n, uint16_t* out);

// Causal attention of one query position over a bf16 KV cache with GQA.
//   q:      [H, D] f32 (already RoPE'd and scaled; no further scaling is applied)
//   k, v:   cache rows for positions [0, n_ctx): element (s, kv, d) at [s * kv_stride + kv * D + d]
//   out:    [H, D] f32; query head h uses kv head h / (H / K)
//   scratch: at least attend_scratch_floats(n_ctx, H) = H · n_ctx floats (the G = H / K query
//            heads sharing a kv head are processed together so every K/V row is loaded once;
//            each head needs its own row of logits). On return scratch[h · n_ctx + s] holds the
//            unnormalised bf16 weight exp(l − max) of head h at position s.
// Logits are rounded to bf16 before the softmax as in MaxText (float32_logits: false); the
// exponentials are rounded to bf16, their sum and the weighted V sum are accumulated in f32 and
// rounded to bf16, and out = bf16(bf16(Σ e·v) / bf16(Σ e)) (spec §2.2: the einsum and the sum of
// bf16 exps are bf16).
// Throws kiln::Error for n_ctx < 1, K < 1, H not a multiple of K, D < 1 or kv_stride < K · D.
void attend(const float* q, const uint16_t* k, const uint16_t* v, int64_t n_ctx, int64_t H,
            int64_t K, int64_t D, int64_t kv_stride, float* scratch, float* out);
inline int64_t attend_scratch_floats(int64_t n_ctx, int64_t H) {
  return n_ctx * H;
}

// The Llama-3.1 frequency remap MaxText hard-codes (scale_factor 8, low_freq_factor 1,
// high_freq_factor 4, old_context_len 8192), in f32 as MaxText computes it. Exposed for tests.
float llama31_scale_frequency(float freq);

// Name of the Highway target the kernels dispatch to on this CPU (e.g. "AVX3"), for logs.
const char* kernels_target_name();

}  // namespace kiln::ops
