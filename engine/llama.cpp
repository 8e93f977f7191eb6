// The Llama-family forward pass (Llama 2/3/3.1, Mistral, Qwen3-dense), docs/maxtext.md §2.1–2.4:
//
//   x = embed(tokens)                 (every projection W also adds a row's LoRA s·(x·A)·B)
//   for each layer:
//     h   = x + Wo · attention(rope(norm_q(Wq · rms(x))), rope(norm_k(Wk · rms(x))), Wv · rms(x))
//     x   = h + Wd · (silu(Wg · rms(h)) * (Wu · rms(h)))
//   logits = rms(x) · W_out            (or · embeddingᵀ / sqrt(E) when tied)
//
// Activations are f32 holding the bf16 values MaxText would have (the kernels round where MaxText
// rounds, docs/maxtext.md §11); matmul inputs are bf16. Buffers are sized once for `max_chunk`
// tokens.

#include <cmath>
#include <optional>

#include "common/bf16.h"
#include "common/error.h"
#include "engine/model.h"
#include "engine/ops/attention.h"
#include "engine/ops/elementwise.h"
#include "engine/ops/matmul.h"
#include "engine/ops/norms.h"
#include "engine/ops/parallel.h"
#include "engine/ops/rope.h"

namespace kiln {

namespace {

struct LlamaLayer {
  const uint16_t* pre_attn_norm;
  const uint16_t* post_attn_norm;
  const uint16_t* q_norm = nullptr;  // Qwen3 only
  const uint16_t* k_norm = nullptr;
  ops::Linear q, k, v, o;
  ops::Linear wi_0, wi_1, wo;
};

// A single row's attention over at least this many positions runs on the threads (below it,
// waking them costs more than the K kv heads' work).
constexpr int64_t kParallelAttendPositions = 256;
// Rows whose RoPE and cache writes are split over the threads (a row is ≈ 1–2 µs of work).
constexpr int64_t kParallelPrepareRows = 16;

class LlamaModel final : public Model {
 public:
  LlamaModel(std::unique_ptr<Artifact> artifact, const ModelOptions& opt)
      : Model(std::move(artifact), opt.max_chunk),
        c_(config()),
        rope_(c_.rope_layout, c_.head_dim, c_.rope_min_timescale, c_.rope_max_timescale,
              c_.rope_linear_scaling_factor, c_.rope_use_scale, c_.max_target_length) {
    const int64_t E = c_.emb_dim, H = c_.num_query_heads, K = c_.num_kv_heads, D = c_.head_dim,
                  F = c_.mlp_dim, V = c_.vocab_size;
    const Artifact& a = *artifact_;
    ops::LinearOptions lo{chunk_, opt.relayout};
    lo.eager_max_m = opt.decode_rows > 0 ? opt.decode_rows : chunk_;
    lo.context = &matmul_context_;
    for (int64_t l = 0; l < c_.num_decoder_layers; ++l) {
      const BlobView& b = a.layer(l);
      layers_.push_back(LlamaLayer{
          a.bf16(b, "pre_attn_norm", {E}),
          a.bf16(b, "post_attn_norm", {E}),
          c_.use_qk_norm ? a.bf16(b, "attn.q_norm", {D}) : nullptr,
          c_.use_qk_norm ? a.bf16(b, "attn.k_norm", {D}) : nullptr,
          checked_linear(b, "attn.q", {E, H, D}, E, H * D, lo),
          checked_linear(b, "attn.k", {E, K, D}, E, K * D, lo),
          checked_linear(b, "attn.v", {E, K, D}, E, K * D, lo),
          checked_linear(b, "attn.o", {H, D, E}, H * D, E, lo),
          checked_linear(b, "mlp.wi_0", {E, F}, E, F, lo),
          checked_linear(b, "mlp.wi_1", {E, F}, E, F, lo),
          checked_linear(b, "mlp.wo", {F, E}, F, E, lo),
      });
      // Re-laid weights live in the Linears now; the mapped copy would only double the RSS.
      if (layers_.back().q.owns_weights()) a.release_layer_pages(l);
    }
    const BlobView& g = a.globals();
    embedding_ = a.bf16(g, "token_embedding", {V, E});
    final_norm_ = a.bf16(g, "final_norm", {E});
    if (c_.logits_via_embedding) {
      ops::LinearOptions tied = lo;
      tied.transposed = true;  // the tied head multiplies by embeddingᵀ: W is [V, E]
      head_.emplace(embedding_, E, V, tied);
    } else {
      // Read a row per token: the table need not stay resident after its checksum pass.
      a.release_tensor_pages(g, "token_embedding");
      head_.emplace(checked_linear(g, "logits_dense", {E, V}, E, V, lo));
    }
    if (head_->owns_weights())  // the mapped source is read no more
      a.release_tensor_pages(g, c_.logits_via_embedding ? "token_embedding" : "logits_dense");

    auto rows = [&](int64_t n) { return ZeroedVector<float>(size_t(chunk_ * n)); };
    auto rows_bf16 = [&](int64_t n) { return ZeroedVector<uint16_t>(size_t(chunk_ * n)); };
    x_ = rows(E);
    o_ = rows(E);
    q_ = rows(H * D);
    k_ = rows(K * D);
    v_ = rows(K * D);
    attn_ = rows(H * D);
    gate_ = rows(F);
    up_ = rows(F);
    xb_ = rows_bf16(E);
    attn_b_ = rows_bf16(H * D);
    act_b_ = rows_bf16(F);
    const int threads = std::max(1, ops::max_threads());  // the most any pass runs on
    scores_.resize(size_t(threads * ops::attend_scratch_floats(c_.max_target_length, H / K)));
  }

 private:
  void forward_rows(const Rows& rows, float* logits) override {
    const int64_t E = c_.emb_dim, H = c_.num_query_heads, K = c_.num_kv_heads, D = c_.head_dim,
                  F = c_.mlp_dim;
    const float eps = float(c_.normalization_layer_epsilon);
    const int64_t T = rows.n;

    for (int64_t t = 0; t < T; ++t)
      convert_bf16_to_f32(embedding_ + int64_t(rows.token[t]) * E, x_.data() + t * E, size_t(E));

    for (size_t l = 0; l < layers_.size(); ++l) {
      const LlamaLayer& w = layers_[l];
      // Projection (+ the row's LoRA, if any): y = x·W + s·(x·A)·B.
      auto project = [&](const ops::Linear& lin, LoraSlot slot, const uint16_t* x, float* y) {
        lin.forward(x, T, y);
        apply_lora(rows, int64_t(l), slot, x, y);
      };

      // Attention block.
      ops::rms_norm(x_.data(), w.pre_attn_norm, T, E, eps, xb_.data());
      const ops::LinearCall qkv[] = {{&w.q, xb_.data(), T, q_.data()},
                                     {&w.k, xb_.data(), T, k_.data()},
                                     {&w.v, xb_.data(), T, v_.data()}};
      ops::forward_together(qkv);  // one pass over the threads for the three (decode)
      apply_lora(rows, int64_t(l), LoraSlot::q, xb_.data(), q_.data());
      apply_lora(rows, int64_t(l), LoraSlot::k, xb_.data(), k_.data());
      apply_lora(rows, int64_t(l), LoraSlot::v, xb_.data(), v_.data());
      // Per row: the projections rounded to bf16 (as MaxText's outputs are), Qwen3's q/k norms,
      // RoPE, the cache rows, the query scale. Rows are independent, so a prefill chunk's are
      // split over the threads (single-threaded this was ≈ 4 % of a 512-token 1B prefill).
      const auto prepare_rows = [&](int64_t b, int64_t e) {
        float* q = q_.data() + b * H * D;
        float* k = k_.data() + b * K * D;
        ops::round_to_bf16(q, (e - b) * H * D);
        ops::round_to_bf16(k, (e - b) * K * D);
        if (w.q_norm) {
          ops::rms_norm(q, w.q_norm, (e - b) * H, D, eps, q);
          ops::rms_norm(k, w.k_norm, (e - b) * K, D, eps, k);
        }
        for (int64_t t = b; t < e; ++t) {
          const int64_t pos = rows.pos[t];
          rope_.apply(q_.data() + t * H * D, H, pos);
          rope_.apply(k_.data() + t * K * D, K, pos);
          KvCache& kv = *rows.cache[t];
          for (int64_t h = 0; h < K; ++h) {  // head-major cache: [K, capacity, D]
            const int64_t at = (h * kv.capacity + pos) * D;
            ops::to_bf16(k_.data() + (t * K + h) * D, D, kv.k[l].data() + at);
            ops::to_bf16(v_.data() + (t * K + h) * D, D, kv.v[l].data() + at);
          }
        }
        if (c_.query_scale != 1.0) ops::scale_round(q, (e - b) * H * D, float(c_.query_scale));
      };
      ops::run_spans(T, kParallelPrepareRows, ops::max_threads(), prepare_rows);
      // Each (row, kv head) is independent given the caches: the threads take them one at a time,
      // since later positions attend to more keys and a core slowed by its neighbours should take
      // fewer. Item i covers the G = H / K query heads of kv head i % K of row i / K.
      const int64_t G = H / K, scratch = ops::attend_scratch_floats(c_.max_target_length, G);
      auto attend_item = [&](int64_t i, int thread) {
        const int64_t t = i / K, h0 = (i % K) * G;
        const KvCache& kv = *rows.cache[t];
        const int64_t at = (i % K) * kv.capacity * D;  // head-major cache: [K, capacity, D]
        float* out = attn_.data() + (t * H + h0) * D;
        ops::attend(q_.data() + (t * H + h0) * D, kv.k[l].data() + at, kv.v[l].data() + at,
                    rows.pos[t] + 1, G, 1, D, D, D, scores_.data() + thread * scratch, out);
        ops::to_bf16(out, G * D, attn_b_.data() + (t * H + h0) * D);
      };
      // One short row inline: an OpenMP region costs more than its K items. A long one (past
      // kParallelAttendPositions) is spread like a batch: at 4096 positions one thread's
      // attention took ≈ 40 % of a 1B decode step.
      const bool spread = T > 1 || rows.pos[0] + 1 >= kParallelAttendPositions;
      ops::run_each_dynamic(T * K, spread ? ops::max_threads() : 1, attend_item);
      if (max_logits_)
        for (int64_t t = 0; t < T; ++t)
          ops::max_logits(q_.data() + t * H * D, rows.cache[t]->k[l].data(), rows.pos[t] + 1, H, K,
                          D, D, rows.cache[t]->capacity * D, max_logits_ + l * H);
      project(w.o, LoraSlot::o, attn_b_.data(), o_.data());
      ops::add_round(x_.data(), o_.data(), T * E);

      // MLP block.
      ops::rms_norm(x_.data(), w.post_attn_norm, T, E, eps, xb_.data());
      const ops::LinearCall gate_up[] = {{&w.wi_0, xb_.data(), T, gate_.data()},
                                         {&w.wi_1, xb_.data(), T, up_.data()}};
      ops::forward_together(gate_up);
      apply_lora(rows, int64_t(l), LoraSlot::wi_0, xb_.data(), gate_.data());
      apply_lora(rows, int64_t(l), LoraSlot::wi_1, xb_.data(), up_.data());
      // Split over the threads for a batched step (16 × 8192 values), inline for one row.
      ops::run_spans(T * F, int64_t(1) << 16, ops::max_threads(), [&](int64_t b, int64_t e) {
        ops::silu_mul(gate_.data() + b, up_.data() + b, e - b, act_b_.data() + b);
      });
      project(w.wo, LoraSlot::wo, act_b_.data(), o_.data());
      ops::add_round(x_.data(), o_.data(), T * E);
    }

    // Output head, for the rows that want logits.
    if (rows.n_logits == 0) return;
    for (int64_t i = 0; i < rows.n_logits; ++i)
      ops::rms_norm(x_.data() + rows.logit_row[i] * E, final_norm_, 1, E, eps, xb_.data() + i * E);
    head_->forward(xb_.data(), rows.n_logits, logits);
    finish_logits(logits, rows.n_logits * c_.vocab_size);
  }

  const ModelConfig& c_;
  ops::Rope rope_;
  std::vector<LlamaLayer> layers_;
  const uint16_t* embedding_ = nullptr;
  const uint16_t* final_norm_ = nullptr;
  std::optional<ops::Linear> head_;
  // Zero pages until used (common/zeroed_vector.h): a short prompt touches a few rows.
  ZeroedVector<float> x_, o_, q_, k_, v_, attn_, gate_, up_, scores_;
  ZeroedVector<uint16_t> xb_, attn_b_, act_b_;
};

}  // namespace

std::unique_ptr<Model> make_llama_model(std::unique_ptr<Artifact> artifact,
                                        const ModelOptions& opt) {
  return std::make_unique<LlamaModel>(std::move(artifact), opt);
}

}  // namespace kiln
