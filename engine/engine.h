// The engine's entry point: open an artifact, prefill a prompt, generate tokens one at a time —
// for one sequence (prefill / generate), or for several decode slots advanced together by one
// batched pass (insert / generate_slots / release; continuous batching on Model::forward_batch).
// Run-time LoRA adapters of the artifact are loaded by name while the base stays mapped; each
// request names its adapter (or none), and one batched step mixes them row by row.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/lora.h"
#include "engine/model.h"
#include "engine/sampling.h"

namespace kiln {

struct EngineOptions {
  ModelOptions model;
  int64_t max_seq_len = 0;  // 0 → the model's max_target_length
  int64_t slots = 0;        // decode slots for insert / generate_slots (KV caches made at open)
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
  // `adapter`: the name of a loaded adapter (load_adapter), or empty for the base weights.
  int32_t prefill(std::span<const int32_t> prompt, const SamplingParams& sampling,
                  const std::string& adapter = "");
  // Feeds the last sampled token and returns the next one. Allocates nothing.
  int32_t generate();
  // Logits of the last computed position ([vocab]).
  std::span<const float> last_logits() const { return logits_; }
  int64_t position() const { return cache_.length; }

  // Runs `prompt` as a fresh sequence and writes the logits of every position to `out`
  // ([prompt.size(), vocab], f32) — golden files and calibration use this.
  void prefill_logits(std::span<const int32_t> prompt, float* out, const std::string& adapter = "");

  // Run-time LoRA. load_adapter maps adapters/<name>/ as recorded in the artifact's manifest
  // (re-read from disk, so adapters added after open are found) and verifies it; the base weights
  // are not read again. Loading a loaded name again is a no-op. unload_adapter throws while a
  // slot uses it.
  const LoraAdapter& load_adapter(const std::string& name);
  void unload_adapter(const std::string& name);
  std::vector<std::string> loaded_adapters() const;

  // Decode slots (EngineOptions::slots). insert prefills `prompt` into the free slot `slot` and
  // returns its first token; generate_slots advances every active slot by one token in one
  // batched pass and writes each slot's new token to tokens[slot] (-1 for a free slot); a slot's
  // tokens are the same as running its request alone. Throws for an unknown or busy slot, a full
  // context, or bad prompts. generate_slots allocates nothing.
  int64_t slots() const { return int64_t(slots_.size()); }
  int32_t insert(int64_t slot, std::span<const int32_t> prompt, const SamplingParams& sampling,
                 const std::string& adapter = "");
  void generate_slots(std::span<int32_t> tokens);
  void release(int64_t slot);
  bool slot_active(int64_t slot) const { return slots_.at(size_t(slot)).active; }
  int64_t slot_position(int64_t slot) const { return slots_.at(size_t(slot)).cache.length; }

  // QK-Clip calibration: runs every prompt as a fresh sequence and returns, per layer and query
  // head ([layers, heads] row-major), the largest pre-softmax attention logit seen (MaxText's
  // max_logits: after the softmax scale, over unmasked positions), maximised over the prompts.
  std::vector<float> calibrate_max_logits(const std::vector<std::vector<int32_t>>& prompts);

 private:
  Engine(std::unique_ptr<Model> m, int64_t max_seq_len, int64_t slots);
  void check_prompt(std::span<const int32_t> prompt) const;
  const LoraAdapter* adapter_for(const std::string& name) const;

  struct Slot {
    KvCache cache;
    std::unique_ptr<Sampler> sampler;
    std::shared_ptr<const LoraAdapter> adapter;
    int32_t last_token = -1;
    bool active = false;
  };

  std::unique_ptr<Model> model_;
  std::map<std::string, std::shared_ptr<const LoraAdapter>> adapters_;
  std::shared_ptr<const LoraAdapter> adapter_;  // of the single sequence
  std::vector<Slot> slots_;
  std::vector<SequenceStep> steps_;
  std::vector<int64_t> step_slot_;
  std::vector<float> slot_logits_;
  KvCache cache_;
  std::vector<float> logits_;
  std::unique_ptr<Sampler> sampler_;
  int32_t last_token_ = -1;
};

}  // namespace kiln
