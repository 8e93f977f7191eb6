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

// Every head of several query rows over one shared K/V sequence (MQA, as MLA's latent cache is:
// each cache row is the key of every head, and its first Dv values the value). The cache is read
// in blocks of positions that all the queries use while the block is in L1, where attend row by
// row would stream the whole cache once per row and group of heads.
struct SharedKvQueries {
  const float* q = nullptr;  // query (t, h) at q + t·q_row_stride + h·D, f32
  int64_t q_row_stride = 0;
  const int64_t* pos = nullptr;  // row t attends to the positions [0, pos[t]]
  int64_t rows = 0, heads = 0;
  // Output (t, h): Dv f32 values at out + t·out_row_stride + h·out_head_stride.
  float* out = nullptr;
  int64_t out_row_stride = 0, out_head_stride = 0;
};
// k, v: position s at k + s·pos_stride (the same for v), D values of key, the first Dv ≤ D of v
// used. out(t, h) equals, bit for bit, the first Dv values of attend(q(t, h), k, v, pos[t] + 1,
// 1, 1, D, pos_stride, …): the same numerics and the same arithmetic per query, whatever the
// grouping of rows and heads. scratch: attend_shared_kv_scratch_floats(rows, heads, max pos + 1,
// D) floats. Does not allocate. Throws kiln::Error for an empty or inconsistent shape.
void attend_shared_kv(const SharedKvQueries& q, const uint16_t* k, const uint16_t* v, int64_t D,
                      int64_t Dv, int64_t pos_stride, float* scratch);
// The queries per call the engine aims for (a tile of rows × heads): a block of cache rows in L1
// serves this many; more would only grow the logits scratch (queries × context floats).
constexpr int64_t kSharedKvTileQueries = 32;
inline int64_t attend_shared_kv_scratch_floats(int64_t rows, int64_t heads, int64_t n_ctx,
                                               int64_t D) {
  return rows * heads * (D + 1 + n_ctx);
}

// QK-Clip calibration (kiln calibrate): raises max[h] to the largest bf16 attention logit of
// query head h over positions [0, n_ctx) — the softmax input of `attend` for the same arguments,
// i.e. MaxText's max_logits (docs/maxtext.md §3). Not on the serving path; plain loops.
void max_logits(const float* q, const uint16_t* k, int64_t n_ctx, int64_t H, int64_t K, int64_t D,
                int64_t pos_stride, int64_t head_stride, float* max);

}  // namespace kiln::ops
