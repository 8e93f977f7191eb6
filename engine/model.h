// A model ready to compute: the verified artifact plus weights prepared for the matmul kernels.
// One subclass per model family, each with its forward pass in one readable file
// (engine/llama.cpp for Llama 2/3/3.1, Mistral, Qwen3).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/artifact.h"

namespace kiln {

struct ModelOptions {
  int threads = 0;              // 0 → every core
  bool verify_checksums = false;
  bool relayout = true;         // copy weights once into the matmul kernels' preferred layout
  int64_t max_chunk = 512;      // prefill processes at most this many tokens per pass
};

// Keys and values of one sequence, bf16, per layer [capacity, kv_heads · head_dim].
struct KvCache {
  int64_t capacity = 0;
  int64_t length = 0;  // positions filled
  std::vector<std::vector<uint16_t>> k, v;
};

class Model {
 public:
  static std::unique_ptr<Model> open(const std::string& dir, const ModelOptions& opt = {});
  virtual ~Model() = default;

  const Artifact& artifact() const { return *artifact_; }
  const ModelConfig& config() const { return artifact_->config(); }

  KvCache new_cache(int64_t capacity) const;

  // Runs tokens at positions [cache.length, cache.length + n) of one sequence, appending their
  // keys/values to `cache`. Writes f32 logits for every position ([n, vocab]) if `all_logits`,
  // else only for the last one ([vocab]). Allocates nothing.
  virtual void forward(std::span<const int32_t> tokens, KvCache& cache, float* logits,
                       bool all_logits) = 0;

 protected:
  explicit Model(std::unique_ptr<Artifact> a) : artifact_(std::move(a)) {}
  std::unique_ptr<Artifact> artifact_;
};

std::unique_ptr<Model> make_llama_model(std::unique_ptr<Artifact> artifact,
                                        const ModelOptions& opt);

}  // namespace kiln
