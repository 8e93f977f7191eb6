#include "engine/model.h"

#include <thread>

#include "common/error.h"
#include "engine/ops/matmul.h"

namespace kiln {

std::unique_ptr<Model> Model::open(const std::string& dir, const ModelOptions& opt) {
  auto artifact = Artifact::open(dir, {opt.verify_checksums});
  int threads = opt.threads > 0 ? opt.threads : int(std::thread::hardware_concurrency());
  ops::set_num_threads(threads > 0 ? threads : 1);
  const std::string& block = artifact->config().decoder_block;
  if (block == "llama2" || block == "mistral" || block == "qwen3")
    return make_llama_model(std::move(artifact), opt);
  if (block == "deepseek") return make_deepseek_model(std::move(artifact), opt);
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

}  // namespace kiln
