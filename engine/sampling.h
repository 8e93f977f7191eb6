// Choosing the next token from a row of logits: greedy, or temperature / top-k / top-p sampling
// with a seeded generator (same seed, same tokens on every machine).
#pragma once

#include <cstdint>
#include <vector>

namespace kiln {

struct SamplingParams {
  float temperature = 0.0f;  // 0 → greedy (argmax, lowest id on ties)
  int32_t top_k = 0;         // 0 → off
  float top_p = 1.0f;        // 1 → off
  uint64_t seed = 0;
};

// Deterministic pseudo-random generator (SplitMix64 → xoshiro256**).
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1)

 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  // Allocates its scratch for `vocab_size` once.
  Sampler(int64_t vocab_size, const SamplingParams& p);
  // Returns the chosen id. Throws kiln::Error for invalid params (temperature < 0, top_p ∉ (0, 1],
  // top_k < 0). Performs no allocation.
  int32_t sample(const float* logits);
  // log-softmax of the raw (untempered) logits at `id`.
  static float log_prob(const float* logits, int64_t vocab_size, int32_t id);

 private:
  int64_t vocab_;
  SamplingParams p_;
  Rng rng_;
  std::vector<float> probs_;
  std::vector<int32_t> order_;
};

}  // namespace kiln
