#include "engine/runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "common/error.h"
#include "common/process_stats.h"
#include "engine/ops/elementwise.h"

namespace kiln {

AdapterLoad load_adapter_measured(Engine& engine, const std::string& name) {
  AdapterLoad m;
  m.name = name;
  m.rss_before_mib = current_rss_mib();
  const long long faults = major_page_faults();
  const double t0 = now_seconds();
  const LoraAdapter& a = engine.load_adapter(name);
  m.seconds = now_seconds() - t0;
  m.major_faults = major_page_faults() - faults;
  m.rss_after_mib = current_rss_mib();
  m.bytes = a.bytes();
  m.rank = a.max_rank();
  return m;
}

double RunnerStats::prefill_tokens_per_s() const {
  return prefill_seconds > 0 ? double(prompt_tokens) / prefill_seconds : 0;
}

double RunnerStats::decode_tokens_per_s() const {
  return decode_seconds > 0 ? double(decoded) / decode_seconds : 0;
}

Runner::Runner(Engine& engine) : engine_(engine) {}

std::vector<GenerationOutput> Runner::run(const std::vector<GenerationRequest>& reqs,
                                          const SamplingParams& sp, const RunOptions& options) {
  const int64_t S = engine_.slots();
  const int64_t samples = options.samples;
  if (samples < 1 || samples > S)
    throw std::logic_error("Runner::run: " + std::to_string(samples) + " samples for " +
                           std::to_string(S) + " slots");
  for (int64_t s = 0; s < S; ++s)
    if (engine_.slot_busy(s))
      throw StateError("slot " + std::to_string(s) + " is busy: a run needs every slot free");
  const bool packed = options.packed_prefill && samples == 1;
  const size_t k = size_t(samples);
  stats_ = {};
  std::vector<GenerationOutput> out(reqs.size() * k);
  // Sized once, so that a decode step allocates nothing here.
  std::vector<int64_t> slot_out(size_t(S), -1);  // the output each slot produces, or -1 if free
  std::vector<int64_t> free_slots;
  free_slots.reserve(size_t(S));
  size_t next = 0, done = 0;
  auto record = [&](const SlotToken& st) {
    GenerationOutput& o = out[size_t(slot_out[size_t(st.slot)])];
    if (options.on_token) options.on_token(st);
    o.tokens.push_back(st.token);
    o.logprobs.push_back(st.logp);
    ++stats_.generated;
    if (st.finish != FinishReason::None) {
      o.finish = st.finish;
      engine_.release(st.slot);
      slot_out[size_t(st.slot)] = -1;
      ++done;
    }
  };
  // The most tokens a request can produce, so that its output grows without reallocating.
  auto reserve = [&](GenerationOutput& o, size_t prompt_len) {
    int64_t n = engine_.max_seq_len() - int64_t(prompt_len) + 1;
    if (sp.max_new_tokens > 0) n = std::min(n, sp.max_new_tokens);
    o.tokens.reserve(size_t(std::max<int64_t>(n, 1)));
    o.logprobs.reserve(size_t(std::max<int64_t>(n, 1)));
  };
  // A NaN logit is reported at its position; with several requests, in the request's words.
  auto name_request = [&](size_t index, const std::string& slot, const NonFiniteError& e) {
    if (reqs.size() == 1) return e;
    return NonFiniteError("request " + std::to_string(index + 1) + slot, int64_t(index),
                          e.position());
  };
  try {
    while (done < out.size()) {
      free_slots.clear();
      for (int64_t s = 0; s < S; ++s)
        if (slot_out[size_t(s)] < 0) free_slots.push_back(s);
      const size_t n = std::min(free_slots.size() / k, reqs.size() - next);
      if (n > 0) {
        const double t0 = now_seconds();
        std::vector<Prefix> prefixes;
        size_t i = 0;
        try {
          if (samples > 1) {
            for (; i < n; ++i)
              prefixes.push_back(engine_.prefill_multisampling(reqs[next + i].prompt, samples, sp,
                                                               reqs[next + i].adapter));
          } else if (packed) {
            std::vector<PrefillRequest> batch;
            for (size_t j = 0; j < n; ++j)
              batch.push_back({reqs[next + j].prompt, sp, reqs[next + j].adapter});
            prefixes = engine_.prefill_concat(batch);
          } else {
            for (; i < n; ++i)
              prefixes.push_back(
                  engine_.prefill(reqs[next + i].prompt, sp, reqs[next + i].adapter));
          }
        } catch (const NonFiniteError& e) {
          throw name_request(next + (packed ? size_t(e.sequence()) : i), "", e);
        }
        stats_.prefill_seconds += now_seconds() - t0;
        for (i = 0; i < n; ++i, ++next) {
          stats_.prompt_tokens += int64_t(reqs[next].prompt.size());
          const std::span<const int64_t> slots(free_slots.data() + i * k, k);
          for (size_t j = 0; j < k; ++j) {
            slot_out[size_t(slots[j])] = int64_t(next * k + j);
            reserve(out[next * k + j], reqs[next].prompt.size());
          }
          if (samples > 1) {
            for (const SlotToken& st : engine_.bulk_insert(std::move(prefixes[i]), slots))
              record(st);
          } else {
            record(engine_.insert(std::move(prefixes[i]), slots[0]));
          }
        }
      }
      if (done == out.size()) break;  // every request ended with its prefill's token
      const double t1 = now_seconds();
      std::span<const SlotToken> step;
      try {
        step = engine_.generate();
      } catch (const NonFiniteError& e) {
        throw name_request(size_t(slot_out[size_t(e.sequence())]) / k,
                           " (slot " + std::to_string(e.sequence()) + ")", e);
      }
      stats_.decode_seconds += now_seconds() - t1;
      stats_.decoded += int64_t(step.size());
      for (const SlotToken& st : step) record(st);
    }
  } catch (...) {
    // The requests in flight are abandoned: their slots are free for the next run.
    for (int64_t s = 0; s < S; ++s)
      if (engine_.slot_busy(s)) engine_.release(s);
    throw;
  }
  return out;
}

Scorer::Scorer(Engine& engine, std::string adapter)
    : engine_(engine), adapter_(std::move(adapter)) {}

void Scorer::add(std::span<const int32_t> ids) {
  const int64_t V = engine_.config().vocab_size;
  logits_.resize(ids.size() * size_t(V));
  const double t0 = now_seconds();
  engine_.prefill_logits(ids, logits_.data(), adapter_);
  seconds_ += now_seconds() - t0;
  processed_ += int64_t(ids.size());
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    const float* row = logits_.data() + t * size_t(V);
    nll_ += ops::log_sum_exp(row, V) - double(row[ids[t + 1]]);
  }
  predicted_ += int64_t(ids.size()) - 1;
}

double Scorer::perplexity() const {
  return std::exp(nll_ / double(predicted_));
}

}  // namespace kiln
