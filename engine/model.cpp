#include "engine/model.h"

#include <unistd.h>

#include <cmath>
#include <thread>

#include "common/bf16.h"
#include "common/error.h"
#include "engine/ops/matmul.h"

namespace kiln {

std::unique_ptr<Model> Model::open(const std::string& dir, const ModelOptions& opt) {
  auto artifact = Artifact::open(dir, {opt.verify_checksums});
  int threads = opt.threads > 0 ? opt.threads : int(std::thread::hardware_concurrency());
  ops::set_num_threads(threads > 0 ? threads : 1);
  // Re-laid weights live in anonymous memory; a model that would not fit beside the page cache
  // and the rest of the process (e.g. DeepSeek-V2-Lite's 30 GiB on a 23 GiB machine) is used in
  // place from the mapping instead of being killed by the OOM killer halfway through loading.
  ModelOptions o = opt;
  const double physical = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGESIZE));
  if (o.relayout && physical > 0 && double(artifact->total_bytes()) > 0.7 * physical)
    o.relayout = false;
  const std::string& block = artifact->config().decoder_block;
  if (block == "llama2" || block == "mistral" || block == "qwen3")
    return make_llama_model(std::move(artifact), o);
  if (block == "deepseek") return make_deepseek_model(std::move(artifact), o);
  throw Error(dir + ": decoder_block '" + block + "' has no forward pass in this kiln");
}

// The Llama layout; families with another one override this (engine/deepseek.cpp).
KvCache Model::new_cache(int64_t capacity) const {
  const ModelConfig& c = config();
  KvCache cache;
  cache.capacity = capacity;
  size_t row = size_t(c.num_kv_heads * c.head_dim);
  cache.k.assign(size_t(c.num_decoder_layers), std::vector<uint16_t>(size_t(capacity) * row));
  cache.v.assign(size_t(c.num_decoder_layers), std::vector<uint16_t>(size_t(capacity) * row));
  return cache;
}

int64_t Model::kv_bytes_per_token() const {
  const ModelConfig& c = config();
  return c.num_decoder_layers * 2 * c.num_kv_heads * c.head_dim * int64_t(sizeof(uint16_t));
}

void Model::forward(std::span<const int32_t> tokens, KvCache& cache, float* logits,
                    bool all_logits) {
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
  for (int64_t begin = 0; begin < n; begin += chunk_) {
    const int64_t T = std::min(chunk_, n - begin);
    float* out = all_logits ? logits + begin * c.vocab_size : logits;
    forward_chunk(tokens.data() + begin, T, cache, out, all_logits, begin + T == n);
  }
}

void Model::check_cache(const KvCache& cache) const {
  const ModelConfig& c = config();
  const size_t row = size_t(c.num_kv_heads * c.head_dim);
  if (cache.k.size() != size_t(c.num_decoder_layers) || cache.v.size() != cache.k.size() ||
      (!cache.k.empty() && cache.k[0].size() != size_t(cache.capacity) * row))
    throw Error("forward: the KV cache was not made by this model's new_cache()");
}

void Model::finish_logits(float* logits, int64_t n) const {
  const ModelConfig& c = config();
  // jnp.sqrt(E) is a Python float, so JAX divides the bf16 logits by a bf16 constant.
  const float div = c.logits_via_embedding && c.normalize_embedding_logits
                        ? round_to_bf16(float(std::sqrt(double(c.emb_dim))))
                        : 1.0f;
  const float cap = float(c.final_logits_soft_cap);
  for (int64_t i = 0; i < n; ++i) {
    float z = round_to_bf16(logits[i]);
    if (div != 1.0f) z = round_to_bf16(z / div);
    if (cap > 0) z = round_to_bf16(cap * std::tanh(z / cap));
    logits[i] = z;
  }
}

}  // namespace kiln
