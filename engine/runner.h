// The request runner: a list of requests served with continuous batching over an engine's decode
// slots, with the timings of its prefill and decode phases. `kiln run`, `kiln bench` and the C
// API's kiln_run (and so tools/examples/kiln_example.c) all serve requests through it. Beside it,
// the scorer of `kiln eval`: sequences' negative log-likelihood, for their perplexity.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "common/clock.h"
#include "engine/engine.h"

namespace kiln {

// What loading a run-time adapter into an open engine cost. The engine maps the adapter's blobs
// only, so the resident set grows by about the adapter's size and the base weights are not touched.
struct AdapterLoad {
  std::string name;
  double seconds = 0, rss_before_mib = 0, rss_after_mib = 0;
  uint64_t bytes = 0;  // the adapter's mapped blob bytes
  int64_t rank = 0;    // its largest rank
  long long major_faults = 0;
};

// Engine::load_adapter(name), timed and with the resident set and major page faults around it.
AdapterLoad load_adapter_measured(Engine& engine, const std::string& name);

struct GenerationRequest {
  std::vector<int32_t> prompt;
  std::string adapter;  // a loaded run-time adapter, or empty for the base weights
};

// What one request (or one sample of it) produced.
struct GenerationOutput {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  FinishReason finish = FinishReason::None;
};

// The timings of one Runner::run.
struct RunnerStats {
  double prefill_seconds = 0;  // in prefill calls
  double decode_seconds = 0;   // in generate() steps
  int64_t prompt_tokens = 0;
  int64_t generated = 0;  // every output token, the prefills' first ones included
  int64_t decoded = 0;    // the tokens of generate() steps

  double prefill_tokens_per_s() const;  // 0 when nothing was timed
  double decode_tokens_per_s() const;
};

struct RunOptions {
  // Samples per request: > 1 prefills each request once (prefill_multisampling) and decodes its
  // samples in that many slots together (bulk_insert); in [1, engine slots].
  int64_t samples = 1;
  // One sample per request: the requests that enter free slots together are prefilled in one
  // packed pass (prefill_concat) instead of one by one.
  bool packed_prefill = false;
  // Sees every token as it is produced (optional).
  std::function<void(const SlotToken&)> on_token;
};

class Runner {
 public:
  explicit Runner(Engine& engine);

  // Serves `requests` with `sampling`: whenever slots are free the next requests are prefilled and
  // inserted, and every step advances all active slots together; a finished request frees its
  // slot. Returns the outputs in request order, a request's samples in sample order. Every slot
  // must be free (kiln::StateError otherwise), and every slot is free again when it returns or
  // throws. A non-finite logit throws NonFiniteError naming the request (when there are several)
  // and the position.
  std::vector<GenerationOutput> run(const std::vector<GenerationRequest>& requests,
                                    const SamplingParams& sampling, const RunOptions& options = {});

  // The timings of the last run.
  const RunnerStats& stats() const { return stats_; }

 private:
  Engine& engine_;
  RunnerStats stats_;
};

// Scores sequences on every next token (one prefill each): the total negative log-likelihood and
// so the perplexity exp(nll / predicted).
class Scorer {
 public:
  Scorer(Engine& engine, std::string adapter);

  // Adds ids[1..] given the tokens before each. Throws as Engine::prefill_logits does
  // (NonFiniteError for a non-finite logit).
  void add(std::span<const int32_t> ids);

  double nll() const { return nll_; }
  int64_t predicted() const { return predicted_; }  // tokens scored
  int64_t processed() const { return processed_; }  // tokens prefilled
  double seconds() const { return seconds_; }       // in prefills
  double perplexity() const;

 private:
  Engine& engine_;
  std::string adapter_;
  std::vector<float> logits_;  // [tokens, vocab] of the last sequence, reused
  double nll_ = 0, seconds_ = 0;
  int64_t predicted_ = 0, processed_ = 0;
};

}  // namespace kiln
