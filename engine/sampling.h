// Choosing the next token from a row of logits with MaxEngine's sampling algorithms and a seeded
// generator (same seed, same tokens on every machine).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

// MaxText's decode_sampling_strategy values (docs/maxtext.md §6).
enum class SamplingAlgorithm { Greedy, Weighted, TopK, Nucleus, Composite };
const char* sampling_algorithm_name(SamplingAlgorithm a);  // "greedy", "weighted", "topk", …
// Parses a name as above; throws kiln::Error listing the valid names.
SamplingAlgorithm parse_sampling_algorithm(const std::string& name);

// One request's sampling (docs/maxtext.md §6 table):
//   greedy     argmax, lowest id on ties (temperature, top_k, top_p ignored)
//   weighted   categorical(logits / T); T > 0
//   topk       categorical over the top_k largest logits / T; top_k > 0, T > 0
//   nucleus    sort descending; cumulative softmax of the untempered logits; cutoff index =
//              #(cum < top_p); keep logits ≥ the cutoff logit (ties kept); categorical(kept / T);
//              top_p ≥ 0 (≥ 1 keeps everything), T > 0
//   composite  top_k, then the cumulative softmax of the untempered top-k; keep sorted indices ≤
//              the first reaching top_p; categorical(kept / max(T, 1e-6)); top_k > 0, 0 < top_p ≤ 1
// Request limits (used by the Engine's slots, not by the Sampler): `stop_tokens` end a request
// when sampled (the stop token is returned); `max_new_tokens` counts every token produced,
// the prefill's first token included (0: until the context is full).
struct SamplingParams {
  SamplingAlgorithm algorithm = SamplingAlgorithm::Greedy;
  float temperature = 1.0f;  // MaxText's decode_sampling_temperature default
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  std::vector<int32_t> stop_tokens;
  int64_t max_new_tokens = 0;
};

// The algorithm the legacy knobs imply (what `kiln run --temperature/--top-k/--top-p` means
// without --sampling): temperature 0 → greedy; else top_k and top_p < 1 → composite, top_k →
// topk, top_p < 1 → nucleus, neither → weighted.
SamplingAlgorithm infer_sampling_algorithm(float temperature, int32_t top_k, float top_p);

// Sets sp.algorithm and sp.temperature as `kiln run` (and the Python package) read their knobs:
// with an algorithm named (MaxText's name), the temperature defaults to 1; without one, it
// defaults to 0 and the algorithm is what it and sp.top_k / sp.top_p imply. Throws kiln::Error
// for an unknown name.
void resolve_sampling_algorithm(SamplingParams& sp, const std::optional<std::string>& name,
                                std::optional<float> temperature);

// The seed of sample `index` of a multi-sample request (Engine::prefill_multisampling): index 0 is
// `seed` itself (so one sample equals a plain prefill), the others are decorrelated streams.
uint64_t sample_seed(uint64_t seed, int64_t index);

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
  // Allocates its scratch for `vocab_size` once. Throws kiln::Error for parameters the algorithm
  // does not accept (see SamplingParams) and for stop tokens outside the vocabulary.
  Sampler(int64_t vocab_size, const SamplingParams& p);
  // Returns the chosen id. Performs no allocation.
  int32_t sample(const float* logits);
  const SamplingParams& params() const { return p_; }
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
