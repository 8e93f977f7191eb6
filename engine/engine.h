// The engine's entry point: open an artifact, prefill a prompt, generate tokens one at a time.
// This is the single-sequence core; the slot-based serving API (MaxEngine semantics: prefix,
// insert, batched generate) is built on the same Model::forward.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/sampling.h"

namespace kiln {

struct EngineOptions {
  ModelOptions model;
  int64_t max_seq_len = 0;  // 0 → the model's max_target_length
};

class Engine {
 public:
  static std::unique_ptr<Engine> open(const std::string& dir, const EngineOptions& opt = {});

  const ModelConfig& config() const { return model_->config(); }
  Model& model() { return *model_; }
  int64_t max_seq_len() const { return cache_.capacity; }

  // Starts a new sequence with `prompt` and returns the first token sampled from the logits of
  // its last position. Throws kiln::Error for an empty prompt, ids outside the vocabulary or a
  // prompt longer than the context.
  int32_t prefill(std::span<const int32_t> prompt, const SamplingParams& sampling);
  // Feeds the last sampled token and returns the next one. Allocates nothing.
  int32_t generate();
  // Logits of the last computed position ([vocab]).
  std::span<const float> last_logits() const { return logits_; }
  int64_t position() const { return cache_.length; }

  // Runs `prompt` as a fresh sequence and writes the logits of every position to `out`
  // ([prompt.size(), vocab], f32) — golden files and calibration use this.
  void prefill_logits(std::span<const int32_t> prompt, float* out);

  // QK-Clip calibration: runs every prompt as a fresh sequence and returns, per layer and query
  // head ([layers, heads] row-major), the largest pre-softmax attention logit seen (MaxText's
  // max_logits: after the softmax scale, over unmasked positions), maximised over the prompts.
  std::vector<float> calibrate_max_logits(const std::vector<std::vector<int32_t>>& prompts);

 private:
  Engine(std::unique_ptr<Model> m, int64_t max_seq_len);
  void check_prompt(std::span<const int32_t> prompt) const;

  std::unique_ptr<Model> model_;
  KvCache cache_;
  std::vector<float> logits_;
  std::unique_ptr<Sampler> sampler_;
  int32_t last_token_ = -1;
};

}  // namespace kiln
