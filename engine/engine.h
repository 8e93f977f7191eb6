// The serving API, with MaxEngine's semantics (docs/maxtext.md §6): prefill a prompt into a Prefix
// (its KV cache, the logits at its last position and the first sampled token), insert the Prefix
// into a free decode slot, and advance every active slot by one token per generate() — one batched
// forward pass for all of them (continuous batching on Model::forward_batch). A request's tokens
// and log-probabilities do not depend on what else is batched with it.
//
// Run-time LoRA adapters of the artifact are loaded by name while the base stays mapped; each
// request names its adapter (or none), and one batched step mixes them row by row.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "engine/lora.h"
#include "engine/model.h"
#include "engine/sampling.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

// The most worker threads an engine runs (ModelOptions::threads, `--threads`): far more than any
// machine's cores, and few enough that the OpenMP runtime can always start them.
inline constexpr int kMaxThreads = 1024;

struct EngineOptions {
  ModelOptions model;       // threads in [0, kMaxThreads]; slots below in [1, model.max_chunk]
  int64_t max_seq_len = 0;  // 0 → the model's max_target_length
  int64_t slots = 1;        // decode slots; their KV caches (slots × max_seq_len) are made at open
};

// A prefilled prompt, ready to insert into a slot (MaxEngine's Prefix).
struct Prefix {
  KvCache cache;                  // the prompt's positions (capacity = prompt length)
  std::vector<float> logits;      // [vocab] f32 at the last prompt position
  std::vector<int32_t> tokens;    // the first sampled token; n of them from multisampling
  std::vector<float> token_logp;  // log-softmax of the raw logits at each sampled token
  int64_t next_pos = 0;           // the position the first generated token goes to
  std::vector<std::unique_ptr<Sampler>> samplers;  // one per sample, continuing its stream
  std::shared_ptr<const LoraAdapter> adapter;      // nullptr: the base weights
};

// One prompt of Engine::prefill_concat.
struct PrefillRequest {
  std::span<const int32_t> tokens;
  SamplingParams sampling;
  std::string adapter;  // a loaded adapter's name, or empty
};

enum class FinishReason { None, Stop, Length, Context };
const char* finish_reason_name(FinishReason r);  // "", "stop", "length", "context"

// A slot's token from generate() (or from insert: the prefill's token).
struct SlotToken {
  int64_t slot = -1;
  int32_t token = -1;
  float logp = 0;  // log-softmax of the raw logits at `token`
  // Set on the request's last token: a stop token, max_new_tokens reached, or the context full.
  // The slot then stays busy (not advanced) until release().
  FinishReason finish = FinishReason::None;
};

class Engine {
 public:
  static std::unique_ptr<Engine> open(const std::string& dir, const EngineOptions& opt = {});

  const ModelConfig& config() const { return model_->config(); }
  Model& model() { return *model_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t slots() const { return int64_t(slots_.size()); }
  // The artifact's tokenizer (`kiln export --tokenizer`), or nullptr if it was exported without.
  const Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }

  // --- prefill ---------------------------------------------------------------------------------
  // Runs `prompt` and samples its first token. Throws kiln::Error for an empty prompt, a prompt
  // longer than the context, an id outside the vocabulary or bad sampling parameters (see
  // check_request), kiln::StateError for an adapter that is not loaded, NonFiniteError for a NaN
  // or inf logit (naming the position).
  Prefix prefill(std::span<const int32_t> prompt, const SamplingParams& sampling,
                 const std::string& adapter = "");
  // One prefill, then `n` independent first tokens from the same logits; sample i draws from the
  // stream sample_seed(sampling.seed, i), which its slot continues (bulk_insert). Each sample
  // needs a slot of its own, so n is in [1, slots()].
  Prefix prefill_multisampling(std::span<const int32_t> prompt, int64_t n,
                               const SamplingParams& sampling, const std::string& adapter = "");
  // Several prompts packed into one forward pass: every row carries its own position (restarting
  // at 0 per prompt) and its own cache, so attention stays inside its prompt (what MaxText's
  // segment ids do). Prompts are packed up to max_chunk tokens per pass; a longer prompt gets a
  // pass of its own. Each result equals that prompt's own prefill(). A NaN or inf logit throws
  // NonFiniteError naming the prompt's index and the position.
  std::vector<Prefix> prefill_concat(std::span<const PrefillRequest> requests);

  // --- decode slots ----------------------------------------------------------------------------
  // Copies the prefix's cache into free slot `slot` and returns the prefill's token (with its
  // finish reason: it may already end the request). Throws kiln::Error for an unknown slot or a
  // multi-sample prefix, kiln::StateError for a busy slot; the prefix is consumed only on success.
  SlotToken insert(Prefix&& prefix, int64_t slot);
  // Sample i of a multisampling prefix into slots[i] (as many slots as samples).
  std::vector<SlotToken> bulk_insert(Prefix&& prefix, std::span<const int64_t> slots);
  // Advances every active (inserted, unfinished) slot by one token in one batched pass and
  // returns their tokens in slot order (empty when no slot is active). The span stays valid until
  // the next call. Allocates nothing. A NaN or inf logit throws NonFiniteError naming the slot and
  // position; then no slot has advanced.
  std::span<const SlotToken> generate();
  // Frees a busy slot (finished or not). Throws kiln::Error for an unknown slot, kiln::StateError
  // for a free one.
  void release(int64_t slot);
  bool slot_busy(int64_t slot) const { return slot_state(slot).busy; }
  bool slot_finished(int64_t slot) const { return slot_state(slot).finish != FinishReason::None; }
  int64_t slot_position(int64_t slot) const { return slot_state(slot).cache.length; }

  // --- reference tooling -----------------------------------------------------------------------
  // Runs `prompt` as a fresh sequence and writes the logits of every position to `out`
  // ([prompt.size(), vocab], f32) — golden files use this. Uses no slot.
  void prefill_logits(std::span<const int32_t> prompt, float* out, const std::string& adapter = "");
  // QK-Clip calibration: runs every prompt as a fresh sequence and returns, per layer and query
  // head ([layers, heads] row-major), the largest pre-softmax attention logit seen (MaxText's
  // max_logits: after the softmax scale, over unmasked positions), maximised over the prompts.
  std::vector<float> calibrate_max_logits(const std::vector<std::vector<int32_t>>& prompts);

  // --- run-time LoRA ---------------------------------------------------------------------------
  // load_adapter maps adapters/<name>/ as recorded in the artifact's manifest (re-read from disk,
  // so adapters added after open are found) and verifies it (every checksum, unless the engine
  // was opened without verify_checksums); the base weights are not read again.
  // Loading a loaded name again is a no-op. unload_adapter throws kiln::StateError for a name that
  // is not loaded or while a busy slot uses it.
  const LoraAdapter& load_adapter(const std::string& name);
  void unload_adapter(const std::string& name);
  std::vector<std::string> loaded_adapters() const;

  // Throws kiln::Error (one line) for what prefill would refuse as bad input: an empty prompt,
  // one longer than the context, a token outside the vocabulary, sampling parameters the
  // algorithm does not accept. Lets a caller check a batch before running any of it.
  void check_request(std::span<const int32_t> prompt, const SamplingParams& sampling) const;

 private:
  struct Slot {
    KvCache cache;
    std::unique_ptr<Sampler> sampler;
    std::shared_ptr<const LoraAdapter> adapter;
    int32_t last_token = -1;
    int64_t produced = 0;  // tokens of this request so far, the prefill's included
    bool busy = false;
    FinishReason finish = FinishReason::None;
  };

  // Held by every call that changes the engine (or runs its model): a call while another thread
  // holds it throws StateError instead of corrupting the slots. Re-entrant on the holding thread.
  class ExclusiveUse;

  Engine(std::unique_ptr<Model> m, int64_t max_seq_len, int64_t slots);
  const Slot& slot_state(int64_t slot) const;
  void check_prompt(std::span<const int32_t> prompt) const;
  std::shared_ptr<const LoraAdapter> adapter_for(const std::string& name) const;
  Prefix new_prefix(std::span<const int32_t> prompt, const std::string& adapter);
  void sample_first(Prefix& p, const SamplingParams& sampling, int64_t n) const;
  SlotToken place(Prefix& p, size_t sample, int64_t slot);
  FinishReason finish_of(const Slot& s, int32_t token) const;

  std::unique_ptr<Model> model_;
  mutable std::atomic<std::thread::id> user_{};  // the thread inside a call, or none
  std::optional<Tokenizer> tokenizer_;
  int64_t max_seq_len_ = 0;
  std::map<std::string, std::shared_ptr<const LoraAdapter>> adapters_;
  std::vector<Slot> slots_;
  // generate()'s batch, sized at open so the per-token path allocates nothing.
  std::vector<SequenceStep> steps_;
  std::vector<int64_t> step_slot_;
  std::vector<float> step_logits_;
  std::vector<SlotToken> step_tokens_;
  KvCache scratch_cache_;  // prefill_logits and calibration
};

}  // namespace kiln
