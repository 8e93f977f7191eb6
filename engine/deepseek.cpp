// clang-format off
// The DeepSeek-family forward pass (DeepSeek V2/V3, Kimi K2: decoder_block deepseek),
// docs/maxtext.md §2.1, §2.2, §2.3(c), §2.5–2.7:
//
//   x = embed(tokens)
//   for each layer (the first first_num_dense_layers dense, the rest MoE):
//     h = x + MLA(rms(x))
//     x = h + FFN(rms(h))        FFN = SwiGLU MLP (dense) | routed experts + shared experts (MoE)
//   logits = rms(x) · W_out      (or · embeddingᵀ [/ sqrt(E)] when tied)
//
// MLA with a latent KV cache. MaxText computes, per head h (docs/maxtext.md §2.5),
//   q = [q_nope | q_pe] = (rms(x·Wq_a)·Wq_b  or  x·Wquery),   q_pe ← YaRN(q_pe)
//   query = bf16([q_nope | q_pe] · s)                  (s: softmax scale incl. mscale²)
//   [c | k_pe] = x·Wkv_a,   c ← rms(c) (the latent, Rkv values),   k_pe ← YaRN(k_pe) (one per token)
//   k_nope[h], v[h] = c·Wkv_b[:, h, :Dn],  c·Wkv_b[:, h, Dn:]
//   score(s) = query_nope[h]·k_nope[h](s) + query_pe[h]·k_pe(s);   out[h] = Σ p(s)·v[h](s)
// The cache holds per token only c and k_pe (Rkv + Dr bf16 values per layer, never the expanded
// H·(Dn + Dr + Dv) keys and values), and attention runs in the latent space by absorbing Wkv_b:
//   q_lat[h] = query_nope[h] · Wkv_b[:, h, :Dn]ᵀ           (Rkv values, f32)
//   score(s) = q_lat[h]·c(s) + query_pe[h]·k_pe(s)          (= the expanded score, up to rounding)
//   out_lat[h] = Σ p(s)·c(s);   out[h] = out_lat[h] · Wkv_b[:, h, Dn:]
// clang-format on
// So one cache row [c | k_pe] serves as the key of every head, and its first Rkv values as the
// value: an MQA with head dim Rkv + Dr run by ops::attend_shared_kv, which reads each block of
// cache rows once for all the heads of a tile of rows. Wkv_b is read in place from the artifact
// by two small strided kernels (ops::matmul_xwt / matmul_xw); nothing is re-laid for it.
//
// Prefill uses the same absorbed path as decode, so decode and prefill do the same arithmetic
// (tests/unit/deepseek_test.cpp: decode-step logits equal a full prefill's). Measured against the
// expanded computation of tests/reference/deepseek_ref.py (MaxText's), the 30 e2e fixtures give
// max|Δlogit| of 0.6–1.7% of max|logit| (limit 2%; tests/e2e/test_deepseek_e2e.py prints them),
// with top-1 and 32 greedy tokens identical everywhere; a numpy emulation of this absorbed path
// with these rounding points reproduces kiln's logits bit for bit, so the whole difference is the
// absorption's rounding (the fixtures' bf16 attention logits make one flipped rounding visible).
// Expanding for prefill would make prefill match the reference exactly but move the same
// difference between decode and prefill. Cost of absorbing: per (query, key, head) Rkv + Dr + Rkv
// multiply-adds instead of Dn + Dr + Dv — about 3.4× the attention FLOPs at DeepSeek's shapes
// (1–2% of a 512-token prefill of a DeepSeek-V2-Lite-shaped model), and no chunk ever expands the
// cached context.
//
// Rounding (docs/maxtext.md §11; as deepseek_ref.py): every projection output, RMSNorm output, RoPE
// output, the scaled query (s itself taken as a bf16 constant, JAX weak typing), the attention
// logits and exponentials (ops::attend), the attention output (after Wkv_b's value slice), residual
// adds, the MLP product and every MoE rounding point listed in engine/ops/moe.h. What the
// absorption changes: k_nope and v are never materialised, so MaxText's bf16 rounding of them has
// no counterpart, q_lat stays f32, and the attention's bf16 weighted sum is taken over the latent
// (Rkv values) rather than over v (Dv values) — differences of the size of one bf16 rounding.
//
// MoE (docs/maxtext.md §2.7): the router (ops::Router) picks k experts per token; the batch's
// (token, expert) pairs are grouped by expert (ops::ExpertBatches) so each selected expert runs
// once per step with M = its token count (gather rows → Linear → scatter-add with the routing
// weight); experts nobody chose are not touched. The weighted sum is f32 in expert-index order (the
// same order for a token whether it is decoded alone or prefilled with others), rounded to bf16,
// plus the shared experts (a SwiGLU MLP of width shared_experts · moe_mlp_dim).
//
// Activations are f32 holding bf16 values; matmul inputs bf16. Every buffer is sized once for
// `max_chunk` tokens; the decode step allocates nothing.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>

#include "common/bf16.h"
#include "common/error.h"
#include "engine/model.h"
#include "engine/ops/attention.h"
#include "engine/ops/elementwise.h"
#include "engine/ops/matmul.h"
#include "engine/ops/matmul_strided.h"
#include "engine/ops/moe.h"
#include "engine/ops/norms.h"
#include "engine/ops/parallel.h"
#include "engine/ops/rope.h"

namespace kiln {

namespace {

struct Mlp {
  ops::Linear wi_0, wi_1, wo;
};

struct DeepSeekLayer {
  const uint16_t* pre_attn_norm = nullptr;
  const uint16_t* post_attn_norm = nullptr;
  // Query: wq_a → RMSNorm(q_a_norm) → wq_b when q_lora_rank > 0, else the plain `query`.
  std::optional<ops::Linear> wq_a, wq_b, query;
  const uint16_t* q_a_norm = nullptr;
  std::optional<ops::Linear> wkv_a, o;
  const uint16_t* kv_a_norm = nullptr;
  const uint16_t* wkv_b = nullptr;  // [Rkv, H, Dn + Dv], read in place (absorbed attention)
  std::optional<Mlp> mlp;           // dense layers
  // MoE layers.
  std::optional<ops::Linear> gate;
  const uint16_t* gate_bias = nullptr;
  std::vector<Mlp> experts;
  std::optional<Mlp> shared;
};

// The per-expert matrices are small and many (X · 3 per layer); a re-laid Linear owns memory in
// 2 MiB huge-page units, so re-laying a tiny expert would waste most of it. Real experts (≥ 1 MiB:
// DeepSeek-V2-Lite 5.8 MB, V3 29 MB) are re-laid like every other matrix; smaller ones are read in
// place.
constexpr int64_t kMinRelayoutBytes = int64_t(1) << 20;

class DeepSeekModel final : public Model {
 public:
  DeepSeekModel(std::unique_ptr<Artifact> artifact, const ModelOptions& opt)
      : Model(std::move(artifact), opt.max_chunk),
        c_(config()),
        E_(c_.emb_dim),
        H_(c_.num_query_heads),
        Rq_(c_.q_lora_rank),
        Rkv_(c_.kv_lora_rank),
        Dn_(c_.qk_nope_head_dim),
        Dr_(c_.qk_rope_head_dim),
        Dv_(c_.v_head_dim),
        Dqk_(Dn_ + Dr_),
        Dl_(Rkv_ + Dr_),
        rope_(yarn_params(c_), Dr_, rope_positions(c_)) {
    if (!c_.is_deepseek())
      throw Error(artifact_->dir() + ": the DeepSeek forward pass got decoder_block '" +
                  c_.decoder_block + "'");
    const int64_t E = E_, H = H_, V = c_.vocab_size;
    const Artifact& a = *artifact_;
    ops::LinearOptions lo{chunk_, opt.relayout};
    lo.eager_max_m = opt.decode_rows > 0 ? opt.decode_rows : chunk_;
    lo.context = &matmul_context_;
    const bool any_moe = c_.first_num_dense_layers < c_.num_decoder_layers;
    int64_t widest = 1;  // widest MLP intermediate (dense, expert or shared)
    for (int64_t l = 0; l < c_.num_decoder_layers; ++l) {
      const BlobView& b = a.layer(l);
      DeepSeekLayer w;
      w.pre_attn_norm = a.bf16(b, "pre_attn_norm", {E});
      w.post_attn_norm = a.bf16(b, "post_attn_norm", {E});
      if (Rq_ > 0) {
        w.wq_a.emplace(checked_linear(b, "attn.wq_a", {E, Rq_}, E, Rq_, lo));
        w.q_a_norm = a.bf16(b, "attn.q_a_norm", {Rq_});
        w.wq_b.emplace(checked_linear(b, "attn.wq_b", {Rq_, H, Dqk_}, Rq_, H * Dqk_, lo));
      } else {
        w.query.emplace(checked_linear(b, "attn.query", {E, H, Dqk_}, E, H * Dqk_, lo));
      }
      w.wkv_a.emplace(checked_linear(b, "attn.wkv_a", {E, Dl_}, E, Dl_, lo));
      w.kv_a_norm = a.bf16(b, "attn.kv_a_norm", {Rkv_});
      w.wkv_b = a.bf16(b, "attn.wkv_b", {Rkv_, H, Dn_ + Dv_});
      w.o.emplace(checked_linear(b, "attn.o", {H, Dv_, E}, H * Dv_, E, lo));
      if (!c_.is_moe_layer(l)) {
        const int64_t F = c_.mlp_dim;
        w.mlp.emplace(mlp(b, "mlp.", E, F, lo));
        widest = std::max(widest, F);
      } else {
        const int64_t X = c_.num_experts, Fm = c_.moe_mlp_dim, S = c_.shared_experts * Fm;
        w.gate.emplace(checked_linear(b, "moe.gate", {E, X}, E, X, lo));
        if (c_.routed_bias) w.gate_bias = a.bf16(b, "moe.gate_bias", {X});
        // The stacked experts, one Linear each (re-laid when large enough to pay).
        ops::LinearOptions elo = lo;
        elo.relayout = opt.relayout && E * Fm * 2 >= kMinRelayoutBytes;
        std::vector<ops::Linear> wi_0 =
            checked_stacked_linears(b, "moe.experts.wi_0", {X, E, Fm}, E, Fm, X, elo);
        std::vector<ops::Linear> wi_1 =
            checked_stacked_linears(b, "moe.experts.wi_1", {X, E, Fm}, E, Fm, X, elo);
        std::vector<ops::Linear> wo =
            checked_stacked_linears(b, "moe.experts.wo", {X, Fm, E}, Fm, E, X, elo);
        w.experts.reserve(size_t(X));
        for (size_t x = 0; x < size_t(X); ++x)
          w.experts.push_back(Mlp{std::move(wi_0[x]), std::move(wi_1[x]), std::move(wo[x])});
        if (S > 0) w.shared.emplace(mlp(b, "moe.shared.", E, S, lo));
        widest = std::max({widest, Fm, S});
      }
      // Re-laid weights live in the Linears now; what is still read in place (norms, wkv_b, the
      // router bias, small experts) is paged back in on first use.
      const bool relaid = w.wkv_a->owns_weights();
      layers_.push_back(std::move(w));
      if (relaid) a.release_layer_pages(l);
    }
    const BlobView& g = a.globals();
    embedding_ = a.bf16(g, "token_embedding", {V, E});
    final_norm_ = a.bf16(g, "final_norm", {E});
    if (c_.logits_via_embedding) {
      // The tied head multiplies by embeddingᵀ: oneDNN reads the [V, E] table as a transposed W.
      ops::LinearOptions hlo = lo;
      hlo.transposed = true;
      head_.emplace(embedding_, E, V, hlo);
    } else {
      // Read a row per token: the table need not stay resident after its checksum pass.
      a.release_tensor_pages(g, "token_embedding");
      head_.emplace(checked_linear(g, "logits_dense", {E, V}, E, V, lo));
    }
    if (head_->owns_weights())  // the mapped source is read no more
      a.release_tensor_pages(g, c_.logits_via_embedding ? "token_embedding" : "logits_dense");
    query_scale_ = round_to_bf16(float(c_.query_scale));

    auto rows = [&](int64_t n) { return ZeroedVector<float>(size_t(chunk_ * n)); };
    auto rows_bf16 = [&](int64_t n) { return ZeroedVector<uint16_t>(size_t(chunk_ * n)); };
    x_ = rows(E);
    o_ = rows(E);
    xb_ = rows_bf16(E);
    if (Rq_ > 0) {
      cq_ = rows(Rq_);
      cq_b_ = rows_bf16(Rq_);
    }
    q_ = rows(H * Dqk_);
    ckv_ = rows(Dl_);
    qa_ = rows(H * Dl_);
    att_ = rows(H * Dl_);
    vo_ = rows(H * Dv_);
    vo_b_ = rows_bf16(H * Dv_);
    gate_ = rows(widest);
    up_ = rows(widest);
    act_b_ = rows_bf16(widest);
    if (any_moe) {
      const int64_t X = c_.num_experts, k = c_.num_experts_per_tok;
      router_.emplace(ops::RoutingParams::from_config(c_));
      batches_.emplace(X, k, chunk_);
      router_logits_ = rows(X);
      experts_.resize(size_t(chunk_ * k));
      weights_.resize(size_t(chunk_ * k));
      xg_b_ = rows_bf16(E);
      routed_ = rows(E);
      if (c_.shared_experts > 0) shared_out_ = rows(E);
      // A group holds at most every expert and the shared one (moe()).
      group_up_.reserve(size_t(2 * (X + 1)));
      group_down_.reserve(size_t(X + 1));
      group_experts_.reserve(size_t(X));
    }
    const int threads = std::max(1, ops::max_threads());  // the most any pass runs on
    tile_rows_ = std::max<int64_t>(1, ops::kSharedKvTileQueries / H);
    tiles_.reserve(size_t(chunk_));
    scratch_stride_ =
        ops::attend_shared_kv_scratch_floats(tile_rows_, H, c_.max_target_length, Dl_);
    scores_.resize(size_t(threads * scratch_stride_));
  }

  KvCache new_cache(int64_t capacity) const override {
    KvCache cache;
    cache.capacity = capacity;
    for (int64_t l = 0; l < c_.num_decoder_layers; ++l)
      cache.k.emplace_back(size_t(capacity * Dl_));
    return cache;  // v unused: the latent row is both key and value
  }

  void check_cache(const KvCache& cache) const override {
    if (cache.k.size() != layers_.size() || cache.heads != 1 ||
        (cache.capacity > 0 && cache.k[0].size() != size_t(cache.capacity * Dl_)))
      throw Error("forward: the KV cache was not made by this model's new_cache()");
  }

  void reserve_lora(int64_t rank) override {
    Model::reserve_lora(rank);
    if (int64_t(lora_z_.size()) < rank) lora_z_.resize(size_t(rank));
    lora_d_.resize(size_t(std::max(Rkv_, Dv_)));
  }

  int64_t kv_bytes_per_token() const override {
    return c_.num_decoder_layers * Dl_ * int64_t(sizeof(uint16_t));
  }

 private:
  static ops::YarnParams yarn_params(const ModelConfig& c) {
    ops::YarnParams y;
    y.theta = c.rope_max_timescale;
    y.factor = c.rope_factor;
    y.original_max_positions = double(c.original_max_position_embeddings);
    y.beta_fast = c.beta_fast;
    y.beta_slow = c.beta_slow;
    y.interleave = c.rope_interleave;
    y.truncate = c.rope_truncate;
    return y;
  }

  // MaxText's YaRN table covers [0, max_position_embeddings); the engine never goes past
  // max_target_length, so only that much is computed.
  static int64_t rope_positions(const ModelConfig& c) {
    return c.max_position_embeddings > 0 ? std::min(c.max_target_length, c.max_position_embeddings)
                                         : c.max_target_length;
  }

  Mlp mlp(const BlobView& b, const std::string& prefix, int64_t E, int64_t F,
          const ops::LinearOptions& lo) const {
    return Mlp{checked_linear(b, prefix + "wi_0", {E, F}, E, F, lo),
               checked_linear(b, prefix + "wi_1", {E, F}, E, F, lo),
               checked_linear(b, prefix + "wo", {F, E}, F, E, lo)};
  }

  // out[T, E] (f32, unrounded projection output) = (silu(x·Wi0) * (x·Wi1))·Wo, docs/maxtext.md
  // §2.6. With `rows` (the dense MLP; experts take no LoRA), each row adds its adapter's deltas.
  void run_mlp(const Mlp& m, const uint16_t* x, int64_t T, float* out, const Rows* rows = nullptr,
               int64_t layer = 0) {
    const int64_t F = m.wi_0.N();
    const ops::LinearCall gate_up[] = {{&m.wi_0, x, T, gate_.data()}, {&m.wi_1, x, T, up_.data()}};
    ops::forward_together(gate_up);
    if (rows) {
      apply_lora(*rows, layer, LoraSlot::wi_0, x, gate_.data());
      apply_lora(*rows, layer, LoraSlot::wi_1, x, up_.data());
    }
    ops::silu_mul(gate_.data(), up_.data(), T * F, act_b_.data());
    m.wo.forward(act_b_.data(), T, out);
    if (rows) apply_lora(*rows, layer, LoraSlot::wo, act_b_.data(), out);
  }

  void forward_rows(const Rows& rows, float* logits) override {
    const int64_t E = E_, T = rows.n;
    const float eps = float(c_.normalization_layer_epsilon);

    for (int64_t t = 0; t < T; ++t)
      convert_bf16_to_f32(embedding_ + int64_t(rows.token[t]) * E, x_.data() + t * E, size_t(E));

    for (size_t l = 0; l < layers_.size(); ++l) {
      const DeepSeekLayer& w = layers_[l];
      ops::rms_norm(x_.data(), w.pre_attn_norm, T, E, eps, xb_.data());
      attention(w, int64_t(l), rows);
      ops::add_round(x_.data(), o_.data(), T * E);

      ops::rms_norm(x_.data(), w.post_attn_norm, T, E, eps, xb_.data());
      if (w.mlp) {
        run_mlp(*w.mlp, xb_.data(), T, o_.data(), &rows, int64_t(l));
      } else {
        moe(w, T);
      }
      ops::add_round(x_.data(), o_.data(), T * E);
    }

    // Output head, for the rows that want logits.
    if (rows.n_logits == 0) return;
    for (int64_t i = 0; i < rows.n_logits; ++i)
      ops::rms_norm(x_.data() + rows.logit_row[i] * E, final_norm_, 1, E, eps, xb_.data() + i * E);
    head_->forward(xb_.data(), rows.n_logits, logits);
    finish_logits(logits, rows.n_logits * c_.vocab_size);
  }

  // MLA over the latent caches (see the top of the file): reads xb_ (normalised input), appends
  // each row's cache entry at its position, writes the output projection to o_.
  void attention(const DeepSeekLayer& w, int64_t layer, const Rows& rows) {
    const int64_t H = H_, Dqk = Dqk_, Dl = Dl_, Rkv = Rkv_, Dn = Dn_, Dr = Dr_, Dv = Dv_;
    const int64_t T = rows.n;
    const float eps = float(c_.normalization_layer_epsilon);
    auto cache_of = [&](int64_t t) { return rows.cache[t]->k[size_t(layer)].data(); };

    // The two projections of xb_ (the query's first and the cache row's) in one product.
    const ops::LinearCall from_x[] = {
        {&*w.wkv_a, xb_.data(), T, ckv_.data()},
        {w.wq_a ? &*w.wq_a : &*w.query, xb_.data(), T, w.wq_a ? cq_.data() : q_.data()}};
    ops::forward_together(from_x);

    // Query [T, H, Dn + Dr]: projection (bf16), YaRN on the rope part, × the softmax scale.
    if (w.wq_a) {
      apply_lora(rows, layer, LoraSlot::wq_a, xb_.data(), cq_.data());
      ops::round_to_bf16(cq_.data(), T * Rq_);
      ops::rms_norm(cq_.data(), w.q_a_norm, T, Rq_, eps, cq_b_.data());
      w.wq_b->forward(cq_b_.data(), T, q_.data());
      apply_lora(rows, layer, LoraSlot::wq_b, cq_b_.data(), q_.data());
    } else {
      apply_lora(rows, layer, LoraSlot::query, xb_.data(), q_.data());
    }
    ops::round_to_bf16(q_.data(), T * H * Dqk);
    for (int64_t t = 0; t < T; ++t) rope_.apply(q_.data() + t * H * Dqk + Dn, H, rows.pos[t], Dqk);
    ops::scale_round(q_.data(), T * H * Dqk, query_scale_);

    // Cache rows: [rms(c) | YaRN(k_pe)], bf16.
    apply_lora(rows, layer, LoraSlot::wkv_a, xb_.data(), ckv_.data());
    ops::round_to_bf16(ckv_.data(), T * Dl);
    for (int64_t t = 0; t < T; ++t) {
      float* src = ckv_.data() + t * Dl;
      uint16_t* row = cache_of(t) + rows.pos[t] * Dl;
      ops::rms_norm(src, w.kv_a_norm, 1, Rkv, eps, row);
      rope_.apply(src + Rkv, 1, rows.pos[t]);
      ops::to_bf16(src + Rkv, Dr, row + Rkv);
    }

    // Absorbed query [T, H, Rkv + Dr]: q_lat = q_nope · W_ukᵀ, then q_pe as is.
    const int64_t wrow = H * (Dn + Dv);  // stride between Wkv_b rows r
    ops::run_each(H, T > 1 || H >= 8 ? ops::max_threads() : 1, [&](int64_t h) {
      const uint16_t* w_uk = w.wkv_b + h * (Dn + Dv);
      ops::matmul_xwt(q_.data() + h * Dqk, H * Dqk, T, w_uk, wrow, Rkv, Dn, qa_.data() + h * Dl,
                      H * Dl);
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(qa_.data() + (t * H + h) * Dl + Rkv, q_.data() + (t * H + h) * Dqk + Dn,
                    size_t(Dr) * sizeof(float));
    });
    if (rows.any_adapter) absorbed_lora_query(rows, layer);

    // Causal attention over each row's cache: one shared key/value row per position for every
    // head (K = 1), its first Rkv values the value. ops::attend_shared_kv reads a block of cache
    // rows once for all the queries of a tile (ops::kSharedKvTileQueries: a few rows' heads), so a
    // prefill chunk streams each row of a long cache a few times instead of once per row and 4
    // heads.
    const int threads = ops::max_threads();
    const auto attend_tile = [&](int64_t t0, int64_t count, int64_t h0, int64_t heads, int thread) {
      const ops::SharedKvQueries q{qa_.data() + t0 * H * Dl + h0 * Dl,
                                   H * Dl,
                                   rows.pos + t0,
                                   count,
                                   heads,
                                   att_.data() + t0 * H * Dl + h0 * Dl,
                                   H * Dl,
                                   Dl};
      const uint16_t* kv = cache_of(t0);
      ops::attend_shared_kv(q, kv, kv, Dl, Rkv, Dl, scores_.data() + thread * scratch_stride_);
    };
    if (T == 1) {
      // One row: its heads split over the threads, 4 or a multiple of 4 each (the kernel's group).
      const int64_t parts = std::min<int64_t>(threads, (H + 3) / 4);
      const int64_t per = ((H + parts - 1) / parts + 3) / 4 * 4;
      ops::run_each(parts, parts > 1 ? threads : 1, [&](int64_t p, int thread) {
        if (p * per < H) attend_tile(0, 1, p * per, std::min(per, H - p * per), thread);
      });
    } else {
      // Tiles of consecutive rows of one cache, handed out longest (latest) first.
      tiles_.clear();
      for (int64_t t = 0; t < T; ++t) {
        if (!tiles_.empty() && tiles_.back().second < tile_rows_ &&
            rows.cache[t] == rows.cache[tiles_.back().first])
          ++tiles_.back().second;
        else
          tiles_.emplace_back(t, 1);
      }
      const int64_t n = int64_t(tiles_.size());
      ops::run_each_dynamic(n, threads, [&](int64_t i, int thread) {
        const auto [t0, count] = tiles_[size_t(n - 1 - i)];
        attend_tile(t0, count, 0, H, thread);
      });
    }
    if (max_logits_)
      for (int64_t t = 0; t < T; ++t)
        ops::max_logits(qa_.data() + t * H * Dl, cache_of(t), rows.pos[t] + 1, H, 1, Dl, Dl, Dl,
                        max_logits_ + layer * H);

    // Back from the latent: out[h] = out_lat[h] · W_uv (bf16), then the output projection.
    ops::run_each(H, T > 1 || H >= 8 ? ops::max_threads() : 1, [&](int64_t h) {
      const uint16_t* w_uv = w.wkv_b + h * (Dn + Dv) + Dn;
      ops::matmul_xw(att_.data() + h * Dl, H * Dl, T, w_uv, wrow, Rkv, Dv, vo_.data() + h * Dv,
                     H * Dv);
    });
    if (rows.any_adapter) absorbed_lora_value(rows, layer);
    ops::to_bf16(vo_.data(), T * H * Dv, vo_b_.data());
    w.o->forward(vo_b_.data(), T, o_.data());
    apply_lora(rows, layer, LoraSlot::o, vo_b_.data(), o_.data());
  }

  // LoRA on Wkv_b (W' = W + s·A·B, A [Rkv, r], B [r, H·(Dn + Dv)]) inside the absorbed attention,
  // without forming W': the key side adds s·A·(B_uk[h]·q_nope[h]) to q_lat[h], the value side
  // s·(out_lat[h]·A)·B_uv[h] to out[h] — the same products as the expanded MaxText computation
  // with the merged weights, up to rounding.
  void absorbed_lora_query(const Rows& rows, int64_t layer) {
    const int64_t H = H_, Dqk = Dqk_, Dl = Dl_, Rkv = Rkv_, Dn = Dn_, Dv = Dv_;
    for (int64_t t = 0; t < rows.n; ++t) {
      const LoraFactors* f =
          rows.adapter[t] ? rows.adapter[t]->get(layer, LoraSlot::wkv_b) : nullptr;
      if (!f) continue;
      const int64_t r = f->rank, N = H * (Dn + Dv);
      for (int64_t h = 0; h < H; ++h) {
        float* z = lora_z_.data();
        ops::matmul_xwt(q_.data() + (t * H + h) * Dqk, Dqk, 1, f->b + h * (Dn + Dv), N, r, Dn, z,
                        r);  // z = B_uk[h] · q_nope[h]
        for (int64_t j = 0; j < r; ++j) z[j] *= f->scale;
        float* d = lora_d_.data();
        ops::matmul_xwt(z, r, 1, f->a, r, Rkv, r, d, Rkv);  // d = A · z
        float* q_lat = qa_.data() + (t * H + h) * Dl;
        for (int64_t i = 0; i < Rkv; ++i) q_lat[i] += d[i];
      }
    }
  }

  void absorbed_lora_value(const Rows& rows, int64_t layer) {
    const int64_t H = H_, Dl = Dl_, Rkv = Rkv_, Dn = Dn_, Dv = Dv_;
    for (int64_t t = 0; t < rows.n; ++t) {
      const LoraFactors* f =
          rows.adapter[t] ? rows.adapter[t]->get(layer, LoraSlot::wkv_b) : nullptr;
      if (!f) continue;
      const int64_t r = f->rank, N = H * (Dn + Dv);
      for (int64_t h = 0; h < H; ++h) {
        float* z = lora_z_.data();
        ops::matmul_xw(att_.data() + (t * H + h) * Dl, Dl, 1, f->a, r, Rkv, r, z,
                       r);  // z = out_lat[h] · A
        for (int64_t j = 0; j < r; ++j) z[j] *= f->scale;
        float* d = lora_d_.data();
        ops::matmul_xw(z, r, 1, f->b + h * (Dn + Dv) + Dn, N, r, Dv, d, Dv);  // d = z · B_uv[h]
        float* out = vo_.data() + (t * H + h) * Dv;
        for (int64_t i = 0; i < Dv; ++i) out[i] += d[i];
      }
    }
  }

  // Routed + shared experts of xb_ into o_ (bf16 values; add_round rounds again, a no-op).
  //
  // The experts run in groups whose rows fit the chunk's buffers, each group as one product of
  // all its gate/up projections, then one of its down projections (ops::forward_together): a
  // decode step's k experts and the shared one are two passes over the threads instead of
  // 3·(k + 1). A token's weighted sum still adds its experts in increasing order, as one expert at
  // a time did, so the results are the same bits.
  void moe(const DeepSeekLayer& w, int64_t T) {
    const int64_t E = E_, X = c_.num_experts, k = c_.num_experts_per_tok;
    w.gate->forward(xb_.data(), T, router_logits_.data());
    ops::round_to_bf16(router_logits_.data(), T * X);
    router_->route(router_logits_.data(), w.gate_bias, T, experts_.data(), weights_.data());
    batches_->build(experts_.data(), T);

    std::fill(routed_.begin(), routed_.begin() + T * E, 0.0f);
    int64_t rows_used = 0, expert_rows = 0, values_used = 0;  // the group's share of the buffers
    group_up_.clear();
    group_down_.clear();
    group_experts_.clear();
    const auto add = [&](const Mlp& m, const uint16_t* x, int64_t M, float* out) {
      const int64_t F = m.wi_0.N();
      group_up_.push_back({&m.wi_0, x, M, gate_.data() + values_used});
      group_up_.push_back({&m.wi_1, x, M, up_.data() + values_used});
      group_down_.push_back({&m.wo, act_b_.data() + values_used, M, out});
      rows_used += M;
      values_used += M * F;
    };
    const auto run_group = [&] {
      ops::forward_together(group_up_);
      ops::silu_mul(gate_.data(), up_.data(), values_used, act_b_.data());
      ops::forward_together(group_down_);
      int64_t row = 0;
      for (int32_t e : group_experts_) {
        for (int32_t p : batches_->pairs(e))
          ops::add_weighted_bf16(routed_.data() + (p / k) * E, o_.data() + row++ * E,
                                 weights_[size_t(p)], E);
      }
      rows_used = expert_rows = values_used = 0;
      group_up_.clear();
      group_down_.clear();
      group_experts_.clear();
    };
    if (w.shared) add(*w.shared, xb_.data(), T, shared_out_.data());
    for (int32_t e : batches_->active()) {
      const std::span<const int32_t> pairs = batches_->pairs(e);
      const int64_t M = int64_t(pairs.size());  // ≤ T ≤ chunk_: one expert always fits a group
      if (rows_used + M > chunk_) run_group();
      uint16_t* xg = xg_b_.data() + expert_rows * E;
      for (int64_t i = 0; i < M; ++i)
        std::memcpy(xg + i * E, xb_.data() + (pairs[size_t(i)] / k) * E,
                    size_t(E) * sizeof(uint16_t));
      add(w.experts[size_t(e)], xg, M, o_.data() + expert_rows * E);
      group_experts_.push_back(e);
      expert_rows += M;
    }
    if (rows_used > 0) run_group();
    ops::round_to_bf16(routed_.data(), T * E);  // the f32 weighted sum, cast to bf16
    if (w.shared) ops::add_round(routed_.data(), shared_out_.data(), T * E);  // bf16(r + bf16(s))
    std::copy(routed_.begin(), routed_.begin() + T * E, o_.begin());
  }

  const ModelConfig& c_;
  int64_t E_, H_, Rq_, Rkv_, Dn_, Dr_, Dv_, Dqk_, Dl_;
  ops::Rope rope_;
  float query_scale_ = 1.0f;
  std::vector<DeepSeekLayer> layers_;
  const uint16_t* embedding_ = nullptr;
  const uint16_t* final_norm_ = nullptr;
  std::optional<ops::Linear> head_;
  std::optional<ops::Router> router_;
  std::optional<ops::ExpertBatches> batches_;
  // Attention tiles: (first row, rows), at most tile_rows_ consecutive rows of one cache each.
  int64_t tile_rows_ = 1;
  std::vector<std::pair<int64_t, int64_t>> tiles_;
  int64_t scratch_stride_ = 0;
  // Activations ([max_chunk, ·]); see attention() and moe() for their roles.
  // Zero pages until used (common/zeroed_vector.h): a short prompt touches a few rows.
  ZeroedVector<float> x_, o_, cq_, q_, ckv_, qa_, att_, vo_, gate_, up_, router_logits_, weights_,
      routed_, shared_out_, scores_;
  // One group of moe(): its projections and its experts, in increasing order.
  std::vector<ops::LinearCall> group_up_, group_down_;
  std::vector<int32_t> group_experts_;
  // Scratch of the Wkv_b LoRA (absorbed_lora_*): r and max(Rkv, Dv) floats.
  std::vector<float> lora_z_, lora_d_;
  ZeroedVector<uint16_t> xb_, cq_b_, vo_b_, act_b_, xg_b_;
  std::vector<int32_t> experts_;
};

}  // namespace

std::unique_ptr<Model> make_deepseek_model(std::unique_ptr<Artifact> artifact,
                                           const ModelOptions& opt) {
  return std::make_unique<DeepSeekModel>(std::move(artifact), opt);
}

}  // namespace kiln
