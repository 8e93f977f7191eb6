// Attention of one query position over a bf16 KV cache (Highway SIMD), rounding to bf16 where
// MaxText does (docs/maxtext.md §2.2, §11). attend does not allocate.
#pragma once

#include <cstdint>

namespace kiln::ops {

// Causal attention of one query position over a bf16 KV cache with GQA.
//   q:      [H, D] f32 (already RoPE'd and scaled; no further scaling is applied)
//   k, v:   caches for positions [0, n_ctx): element (s, kv, d) at [kv * head_stride + s *
//   pos_stride
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
// the sum of bf16 exps are bf16). Throws kiln::Error for n_ctx < 1, K < 1, H not a multiple of K, D
// < 1, pos_stride < D, or head_stride < D with K > 1.
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

}  // namespace kiln::ops
