#include "engine/model.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <thread>

#include "common/bf16.h"
#include "common/clock.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "engine/ops/elementwise.h"
#include "engine/ops/matmul.h"
#include "engine/ops/matmul_strided.h"
#include "engine/ops/parallel.h"

namespace kiln {

std::unique_ptr<Model> Model::open(const std::string& dir, const ModelOptions& opt) {
  int threads = opt.threads > 0 ? opt.threads : int(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  // For the artifact's checks and the Linears, which record the count they were built with.
  const ops::ScopedThreadCount thread_count(threads);
  // Each tensor is checked when the family takes its pointer, right before its re-layout reads it
  // (or, used in place, as the pass that first reads it): the checksum costs no extra read from
  // the page cache.
  auto artifact =
      Artifact::open(dir, {.verify_checksums = opt.verify_checksums, .verify_on_first_use = true});
  // Re-laid weights live in anonymous memory; a model that would not fit beside the page cache
  // and the rest of the process (e.g. DeepSeek-V2-Lite's 30 GiB on a 23 GiB machine) is used in
  // place from the mapping instead of being killed by the OOM killer halfway through loading.
  ModelOptions o = opt;
  const double physical = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGESIZE));
  if (o.relayout && physical > 0 && double(artifact->total_bytes()) > 0.7 * physical)
    o.relayout = false;
  const std::string block = artifact->config().decoder_block;
  std::unique_ptr<Model> model;
  if (block == "llama2" || block == "mistral" || block == "qwen3")
    model = make_llama_model(std::move(artifact), o);
  else if (block == "deepseek")
    model = make_deepseek_model(std::move(artifact), o);
  else
    throw Error(dir + ": decoder_block '" + block + "' has no forward pass in this kiln");
  model->artifact_->verify_remaining();  // a tensor the family did not take is checked all the same
  model->threads_ = threads;
  // Without an engine's slots to go by, only single-row passes count as decode steps; and only
  // passes the hand-written GEMVs serve whole give the same bits on any number of threads.
  model->decode_rows_ =
      std::min(opt.decode_rows > 0 ? opt.decode_rows : 1, model->matmul_context_.gemv_rows());
  model->governor_ = ThreadGovernor(threads, opt.adapt_threads);
  const ops::MatmulContext::BuildTimes build = model->matmul_context_.build_times();
  model->startup_ = {.open_seconds = model->artifact_->open_seconds(),
                     .verify_seconds = model->artifact_->verify_seconds(),
                     .relayout_seconds = build.relayout_seconds,
                     .primitive_seconds = build.primitive_seconds};
  return model;
}

// The Llama layout; families with another one override this (engine/deepseek.cpp).
KvCache Model::new_cache(int64_t capacity) const {
  const ModelConfig& c = config();
  KvCache cache;
  cache.capacity = capacity;
  cache.heads = c.num_kv_heads;
  const size_t size = size_t(capacity * c.num_kv_heads * c.head_dim);
  for (int64_t l = 0; l < c.num_decoder_layers; ++l) {  // each its own zero pages, not copies
    cache.k.emplace_back(size);
    cache.v.emplace_back(size);
  }
  return cache;
}

void copy_cache(const KvCache& src, KvCache& dst) {
  if (src.length > dst.capacity || src.k.size() != dst.k.size() || src.v.size() != dst.v.size() ||
      src.heads != dst.heads)
    throw Error("copy_cache: a cache of " + std::to_string(src.length) +
                " positions does not fit this one (" + std::to_string(dst.capacity) +
                " positions, or another model's layout)");
  const size_t heads = size_t(src.heads);
  auto copy = [&](const std::vector<ZeroedVector<uint16_t>>& from,
                  std::vector<ZeroedVector<uint16_t>>& to) {
    for (size_t l = 0; l < from.size(); ++l) {
      const size_t row = src.capacity > 0 ? from[l].size() / size_t(src.capacity) / heads : 0;
      if (dst.capacity > 0 && to[l].size() / size_t(dst.capacity) / heads != row)
        throw Error("copy_cache: layer " + std::to_string(l) + " rows differ in width");
      for (size_t h = 0; h < heads; ++h)
        std::copy_n(from[l].begin() + ptrdiff_t(h * size_t(src.capacity) * row),
                    size_t(src.length) * row,
                    to[l].begin() + ptrdiff_t(h * size_t(dst.capacity) * row));
    }
  };
  copy(src.k, dst.k);
  copy(src.v, dst.v);
  dst.length = src.length;
}

int64_t Model::kv_bytes_per_token() const {
  const ModelConfig& c = config();
  return c.num_decoder_layers * 2 * c.num_kv_heads * c.head_dim * int64_t(sizeof(uint16_t));
}

Model::Model(std::unique_ptr<Artifact> a, int64_t max_chunk)
    : artifact_(std::move(a)), chunk_(std::max<int64_t>(1, max_chunk)) {
  const size_t n = size_t(chunk_);
  row_token_.resize(n);
  row_pos_.resize(n);
  logit_rows_.resize(n);
  row_cache_.resize(n);
  row_adapter_.resize(n);
}

void Model::validate(std::span<const int32_t> tokens, const KvCache& cache) const {
  const ModelConfig& c = config();
  const int64_t n = int64_t(tokens.size());
  if (n == 0) throw Error("forward: no tokens given");
  check_cache(cache);
  if (cache.length + n > cache.capacity)
    throw Error("forward: sequence of " + std::to_string(cache.length + n) +
                " tokens exceeds the KV cache capacity " + std::to_string(cache.capacity));
  if (cache.length + n > c.max_target_length)
    throw Error("forward: sequence of " + std::to_string(cache.length + n) +
                " tokens exceeds max_target_length " + std::to_string(c.max_target_length));
  for (int32_t t : tokens)
    if (t < 0 || t >= c.vocab_size)
      throw Error("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                  std::to_string(c.vocab_size) + ")");
}

void Model::forward(std::span<const int32_t> tokens, KvCache& cache, float* logits, bool all_logits,
                    const LoraAdapter* adapter) {
  const ModelConfig& c = config();
  validate(tokens, cache);
  const ops::ScopedThreadCount thread_count(threads_);
  if (adapter && adapter->max_rank() > lora_rank_)
    throw Error("forward: adapter '" + adapter->name() + "' needs reserve_lora(" +
                std::to_string(adapter->max_rank()) + ") first");
  const int64_t n = int64_t(tokens.size());
  for (int64_t begin = 0; begin < n; begin += chunk_) {
    const int64_t T = std::min(chunk_, n - begin);
    const bool last = begin + T == n;
    for (int64_t t = 0; t < T; ++t) {
      row_token_[size_t(t)] = tokens[size_t(begin + t)];
      row_pos_[size_t(t)] = cache.length + t;
      row_cache_[size_t(t)] = &cache;
      row_adapter_[size_t(t)] = adapter;
      logit_rows_[size_t(t)] = t;
    }
    Rows rows{T,
              row_token_.data(),
              row_pos_.data(),
              row_cache_.data(),
              row_adapter_.data(),
              adapter != nullptr,
              logit_rows_.data(),
              0};
    if (all_logits) {
      rows.n_logits = T;
    } else if (last) {
      rows.logit_row = logit_rows_.data() + (T - 1);
      rows.n_logits = 1;
    }
    run_pass(rows, all_logits ? logits + begin * c.vocab_size : logits);
    check_finite(rows, /*batch=*/false);
    cache.length += T;
  }
}

void Model::forward_batch(std::span<const SequenceStep> steps, float* logits) {
  int64_t total = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const SequenceStep& s = steps[i];
    if (!s.cache) throw Error("forward_batch: step " + std::to_string(i) + " has no cache");
    validate(s.tokens, *s.cache);
    for (size_t j = 0; j < i; ++j)
      if (steps[j].cache == s.cache)
        throw Error("forward_batch: steps " + std::to_string(j) + " and " + std::to_string(i) +
                    " share one KV cache");
    if (s.adapter && s.adapter->max_rank() > lora_rank_)
      throw Error("forward_batch: adapter '" + s.adapter->name() + "' needs reserve_lora(" +
                  std::to_string(s.adapter->max_rank()) + ") first");
    total += int64_t(s.tokens.size());
  }
  if (steps.empty()) throw Error("forward_batch: no sequences given");
  if (total > chunk_)
    throw Error("forward_batch: " + std::to_string(total) + " tokens exceed max_chunk " +
                std::to_string(chunk_));
  const ops::ScopedThreadCount thread_count(threads_);
  int64_t t = 0;
  bool any_adapter = false;
  for (size_t i = 0; i < steps.size(); ++i) {
    const SequenceStep& s = steps[i];
    for (size_t j = 0; j < s.tokens.size(); ++j, ++t) {
      row_token_[size_t(t)] = s.tokens[j];
      row_pos_[size_t(t)] = s.cache->length + int64_t(j);
      row_cache_[size_t(t)] = s.cache;
      row_adapter_[size_t(t)] = s.adapter;
    }
    logit_rows_[i] = t - 1;
    any_adapter = any_adapter || s.adapter;
  }
  Rows rows{
      total,       row_token_.data(),  row_pos_.data(),      row_cache_.data(), row_adapter_.data(),
      any_adapter, logit_rows_.data(), int64_t(steps.size())};
  run_pass(rows, logits);
  check_finite(rows, /*batch=*/true);
  for (const SequenceStep& s : steps) s.cache->length += int64_t(s.tokens.size());
}

ops::Linear Model::checked_linear(const BlobView& blob, const std::string& name,
                                  const std::vector<int64_t>& shape, int64_t K, int64_t N,
                                  ops::LinearOptions lo) const {
  return std::move(checked_stacked_linears(blob, name, shape, K, N, 1, lo).front());
}

std::vector<ops::Linear> Model::checked_stacked_linears(const BlobView& blob,
                                                        const std::string& name,
                                                        const std::vector<int64_t>& shape,
                                                        int64_t K, int64_t N, int64_t batch,
                                                        ops::LinearOptions lo) const {
  const Artifact::Matrix w = artifact_->matrix_deferred(blob, name, shape, K, batch);
  lo.checksum_weights = w.pending;
  lo.weights_blocked = w.blocked;
  // Matrix i starts K·N values further on in row-major order, a padded matrix further blocked.
  const int64_t stride = w.blocked ? w.layout.matrix_values() : K * N;
  std::vector<ops::Linear> out;
  out.reserve(size_t(batch));
  std::optional<uint32_t> crc = 0u;  // of nothing yet: joining c to it gives c
  for (int64_t i = 0; i < batch; ++i) {
    out.emplace_back(w.data + i * stride, K, N, lo);
    const std::optional<uint32_t> part = out.back().weights_crc32c();
    const uint64_t bytes = uint64_t(K * N) * sizeof(uint16_t);  // what a re-layout's CRC covers
    crc = crc && part ? std::optional(crc32c_combine(*crc, *part, bytes)) : std::nullopt;
  }
  // A separate check's time is counted as checksums, a folded one as part of the re-layout.
  if (w.pending) artifact_->settle_checksum(blob, name, crc);
  return out;
}

void Model::run_pass(const Rows& rows, float* logits) {
  first_nonfinite_ = -1;
  if (rows.n > decode_rows_) {
    forward_rows(rows, logits);
    return;
  }
  const ops::ScopedThreadCount thread_count(governor_.threads_for(rows.n));
  const double t0 = now_seconds();
  forward_rows(rows, logits);
  governor_.record(rows.n, now_seconds() - t0);
}

void Model::check_finite(const Rows& rows, bool batch) const {
  if (first_nonfinite_ < 0) return;
  // Logit row i is row logit_row[i] of the pass, and in a batch the last row of step i.
  const int64_t i = first_nonfinite_ / config().vocab_size;
  const int64_t pos = rows.pos[rows.logit_row[i]];
  throw NonFiniteError(batch ? "sequence " + std::to_string(i) + " of the batch" : "",
                       batch ? i : 0, pos);
}

int64_t Model::lora_dim() const {
  const ModelConfig& c = config();
  int64_t d =
      std::max({c.emb_dim, c.num_query_heads * c.head_dim, c.mlp_dim, c.num_kv_heads * c.head_dim});
  if (c.is_deepseek())
    d = std::max({d, c.q_lora_rank, c.num_query_heads * c.qk_head_dim(),
                  c.kv_lora_rank + c.qk_rope_head_dim,
                  c.num_query_heads * (c.qk_nope_head_dim + c.v_head_dim),
                  c.num_query_heads * c.v_head_dim});
  return d;
}

void Model::reserve_lora(int64_t rank) {
  if (rank <= lora_rank_) return;
  const size_t rows = size_t(chunk_), dim = size_t(lora_dim());
  lora_x_.resize(rows * dim);
  lora_y_.resize(rows * dim);
  lora_u_.resize(rows * size_t(rank));
  lora_rank_ = rank;
}

void Model::apply_lora(const Rows& rows, int64_t layer, LoraSlot slot, const uint16_t* x,
                       float* y) const {
  if (!rows.any_adapter) return;
  // Runs of consecutive rows sharing an adapter go through the factors together.
  for (int64_t t0 = 0; t0 < rows.n;) {
    const LoraAdapter* a = rows.adapter[t0];
    int64_t t1 = t0 + 1;
    while (t1 < rows.n && rows.adapter[t1] == a) ++t1;
    const LoraFactors* f = a ? a->get(layer, slot) : nullptr;
    if (f) {
      const int64_t K = f->in, N = f->out, r = f->rank, T = t1 - t0;
      auto run = [&](int64_t b, int64_t e) {  // rows [t0 + b, t0 + e)
        float* xf = lora_x_.data() + b * K;
        float* u = lora_u_.data() + b * r;
        float* d = lora_y_.data() + b * N;
        convert_bf16_to_f32(x + (t0 + b) * K, xf, size_t((e - b) * K));
        ops::matmul_xw(xf, K, e - b, f->a, r, K, r, u, r);  // u = x·A
        for (int64_t i = 0; i < (e - b) * r; ++i) u[i] *= f->scale;
        ops::matmul_xw(u, r, e - b, f->b, N, r, N, d, N);  // d = s·u·B
        float* yr = y + (t0 + b) * N;
        for (int64_t i = 0; i < (e - b) * N; ++i) yr[i] += d[i];
      };
      ops::run_spans(T, 8, ops::max_threads(), run);
    }
    t0 = t1;
  }
}

void Model::check_cache(const KvCache& cache) const {
  const ModelConfig& c = config();
  const size_t row = size_t(c.num_kv_heads * c.head_dim);
  if (cache.k.size() != size_t(c.num_decoder_layers) || cache.v.size() != cache.k.size() ||
      cache.heads != c.num_kv_heads ||
      (!cache.k.empty() && cache.k[0].size() != size_t(cache.capacity) * row))
    throw Error("forward: the KV cache was not made by this model's new_cache()");
}

namespace {

// Index of the first NaN or ±inf in z[0, n), or n. The common case, all finite, is one
// vectorised pass (an exponent of all ones marks both); the exact index is searched only after.
int64_t first_nonfinite(const float* z, int64_t n) {
  uint32_t any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i)
    any |= uint32_t((std::bit_cast<uint32_t>(z[i]) & 0x7f800000u) == 0x7f800000u);
  if (!any) return n;
  int64_t i = 0;
  while (i < n && std::isfinite(z[i])) ++i;
  return i;
}

}  // namespace

void Model::finish_logits(float* logits, int64_t n) {
  const ModelConfig& c = config();
  // jnp.sqrt(E) is a Python float, so JAX divides the bf16 logits by a bf16 constant.
  const float div = c.logits_via_embedding && c.normalize_embedding_logits
                        ? round_to_bf16(float(std::sqrt(double(c.emb_dim))))
                        : 1.0f;
  const float cap = float(c.final_logits_soft_cap);
  std::atomic<int64_t> first{n};  // the earliest non-finite logit any span saw
  auto finish = [&](int64_t b, int64_t e) {
    float* z = logits + b;
    const int64_t m = e - b;
    ops::round_to_bf16(z, m);  // the head's output is bf16
    if (div != 1.0f || cap > 0)
      for (int64_t i = 0; i < m; ++i) {
        if (div != 1.0f) z[i] = round_to_bf16(z[i] / div);
        if (cap > 0) z[i] = round_to_bf16(cap * std::tanh(z[i] / cap));
      }
    // Checked while the span is still in cache. Finite weights can still overflow bf16, and a
    // NaN must never become a token, a golden file or a perplexity.
    const int64_t at = b + first_nonfinite(z, m);
    if (at < e)
      for (int64_t cur = first.load(); at < cur && !first.compare_exchange_weak(cur, at);) {
      }
  };
  // A batched step finishes 16 × 128 K logits: worth the threads; one row is not.
  ops::run_spans(n, int64_t(1) << 18, ops::max_threads(), finish);
  first_nonfinite_ = first.load() < n ? first.load() : -1;
}

}  // namespace kiln
