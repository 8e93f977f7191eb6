// A model ready to compute: the verified artifact plus weights prepared for the matmul kernels.
// One subclass per model family, each with its forward pass in one readable file
// (engine/llama.cpp for Llama 2/3/3.1, Mistral, Qwen3; engine/deepseek.cpp for DeepSeek V2/V3 and
// Kimi K2).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/artifact.h"

namespace kiln {

struct ModelOptions {
  int threads = 0;  // 0 → every core
  bool verify_checksums = false;
  // Copy weights once into the matmul kernels' preferred layout (anonymous, huge-page memory).
  // Ignored — weights used in place from the mapping — when the artifact exceeds 70 % of the
  // machine's physical memory.
  bool relayout = true;
  int64_t max_chunk = 512;  // prefill processes at most this many tokens per pass
};

// The attention cache of one sequence, bf16, one buffer per layer. Its row layout belongs to the
// model family that made it (Model::new_cache):
//   Llama:    k and v, each [capacity, kv_heads · head_dim].
//   DeepSeek: k only, [capacity, kv_lora_rank + qk_rope_head_dim] rows of the normalised latent
//             and the roped shared key (MLA's compressed cache); v is empty.
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

  // An empty cache for `capacity` positions in this model's layout (see KvCache).
  virtual KvCache new_cache(int64_t capacity) const;
  // Bytes the cache holds per position, summed over the layers.
  virtual int64_t kv_bytes_per_token() const;

  // Runs tokens at positions [cache.length, cache.length + n) of one sequence, appending their
  // keys/values to `cache`. Writes f32 logits for every position ([n, vocab]) if `all_logits`,
  // else only for the last one ([vocab]). Allocates nothing.
  // Throws kiln::Error for token ids outside the vocabulary, a sequence longer than the cache or
  // max_target_length, or a cache from another model's new_cache().
  void forward(std::span<const int32_t> tokens, KvCache& cache, float* logits, bool all_logits);

  // Calibration for QK-Clip: while set, forward() raises max[layer · H + head] to every
  // pre-softmax attention logit it computes (after the softmax scale, unmasked positions only).
  // nullptr (the default) turns it off.
  void record_max_logits(float* max) { max_logits_ = max; }

 protected:
  Model(std::unique_ptr<Artifact> a, int64_t max_chunk)
      : artifact_(std::move(a)), chunk_(std::max<int64_t>(1, max_chunk)) {}

  // One family's forward pass over T ≤ chunk_ tokens at positions [cache.length, + T), request
  // already validated; writes logits of every row (all_logits) or, in the last chunk, of the last.
  virtual void forward_chunk(const int32_t* tokens, int64_t T, KvCache& cache, float* logits,
                             bool all_logits, bool last_chunk) = 0;
  // Throws if `cache` was not made by this model's new_cache().
  virtual void check_cache(const KvCache& cache) const;

  // MaxText's output head: bf16 logits, divided by sqrt(emb_dim) for a normalised tied head, then
  // the optional soft cap, then f32 (spec §2.1).
  void finish_logits(float* logits, int64_t n) const;

  std::unique_ptr<Artifact> artifact_;
  int64_t chunk_;  // prefill processes at most this many tokens per pass
  float* max_logits_ = nullptr;
};

std::unique_ptr<Model> make_llama_model(std::unique_ptr<Artifact> artifact,
                                        const ModelOptions& opt);
std::unique_ptr<Model> make_deepseek_model(std::unique_ptr<Artifact> artifact,
                                           const ModelOptions& opt);

}  // namespace kiln
