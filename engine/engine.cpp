#include "engine/engine.h"

#include <algorithm>
#include <limits>

#include "common/error.h"
#include "engine/ops/parallel.h"
#include "schema/manifest.h"

namespace kiln {

class Engine::ExclusiveUse {
 public:
  explicit ExclusiveUse(const Engine& e) : user_(e.user_) {
    const std::thread::id me = std::this_thread::get_id();
    std::thread::id none;
    if (user_.compare_exchange_strong(none, me)) {
      outer_ = true;
    } else if (none != me) {
      throw StateError(
          "the engine is in use by another thread: an engine serves one thread at a time (open "
          "one engine per thread; engines run side by side)");
    }
  }
  ~ExclusiveUse() {
    if (outer_) user_.store(std::thread::id());
  }
  ExclusiveUse(const ExclusiveUse&) = delete;
  ExclusiveUse& operator=(const ExclusiveUse&) = delete;

 private:
  std::atomic<std::thread::id>& user_;
  bool outer_ = false;
};

std::unique_ptr<Engine> Engine::open(const std::string& dir, const EngineOptions& opt) {
  if (opt.model.threads < 0 || opt.model.threads > kMaxThreads)
    throw Error(dir + ": " + std::to_string(opt.model.threads) +
                " worker threads requested; between 0 (every core) and " +
                std::to_string(kMaxThreads) + " are supported");
  ModelOptions model_options = opt.model;
  model_options.decode_rows = std::max<int64_t>(opt.slots, 1);
  auto model = Model::open(dir, model_options);
  int64_t ctx = model->config().max_target_length;
  if (opt.max_seq_len > ctx)
    throw Error(dir + ": requested context " + std::to_string(opt.max_seq_len) +
                " exceeds the model's max_target_length " + std::to_string(ctx));
  if (opt.slots < 1 || opt.slots > model->max_chunk())
    throw Error(dir + ": " + std::to_string(opt.slots) + " decode slots requested; between 1 and " +
                std::to_string(model->max_chunk()) + " (max_chunk) are supported");
  return std::unique_ptr<Engine>(
      new Engine(std::move(model), opt.max_seq_len > 0 ? opt.max_seq_len : ctx, opt.slots));
}

Engine::Engine(std::unique_ptr<Model> m, int64_t max_seq_len, int64_t slots)
    : model_(std::move(m)), max_seq_len_(max_seq_len) {
  const Manifest& manifest = model_->artifact().manifest();
  if (!manifest.tokenizer.empty())
    tokenizer_.emplace(manifest.tokenizer, model_->artifact().dir() + ": manifest tokenizer");
  slots_.resize(size_t(slots));
  for (Slot& s : slots_) s.cache = model_->new_cache(max_seq_len);
  steps_.reserve(size_t(slots));
  step_slot_.reserve(size_t(slots));
  step_tokens_.reserve(size_t(slots));
  step_logits_.resize(size_t(slots * model_->config().vocab_size));
  scratch_cache_ = model_->new_cache(max_seq_len);
}

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None:
      return "";
    case FinishReason::Stop:
      return "stop";
    case FinishReason::Length:
      return "length";
    case FinishReason::Context:
      return "context";
  }
  return "";
}

const LoraAdapter& Engine::load_adapter(const std::string& name) {
  const ExclusiveUse use(*this);
  if (auto it = adapters_.find(name); it != adapters_.end()) return *it->second;
  const std::string& dir = model_->artifact().dir();
  const bool verify = model_->artifact().verifies_checksums();
  Manifest m = read_manifest_in(dir, verify);
  const AdapterRecord* rec = m.find_adapter(name);
  if (!rec) {
    std::string names;
    for (const auto& a : m.adapters)
      if (!a.merged) names += (names.empty() ? "" : ", ") + a.name;
    throw Error(dir + ": no adapter named '" + name + "' (" +
                (names.empty() ? std::string("the artifact has none") : "it has: " + names) + ")");
  }
  auto adapter = LoraAdapter::open(dir, config(), *rec, verify);
  model_->reserve_lora(adapter->max_rank());
  return *adapters_.emplace(name, std::move(adapter)).first->second;
}

void Engine::unload_adapter(const std::string& name) {
  const ExclusiveUse use(*this);
  auto it = adapters_.find(name);
  if (it == adapters_.end())
    throw StateError("unload_adapter: adapter '" + name + "' is not loaded");
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].busy && slots_[i].adapter == it->second)
      throw StateError("unload_adapter: adapter '" + name + "' is in use by slot " +
                       std::to_string(i));
  adapters_.erase(it);
}

std::vector<std::string> Engine::loaded_adapters() const {
  std::vector<std::string> names;
  for (const auto& [name, a] : adapters_) names.push_back(name);
  return names;
}

std::shared_ptr<const LoraAdapter> Engine::adapter_for(const std::string& name) const {
  if (name.empty()) return nullptr;
  auto it = adapters_.find(name);
  if (it == adapters_.end())
    throw StateError("adapter '" + name + "' is not loaded (load_adapter first)");
  return it->second;
}

// --- prefill ---------------------------------------------------------------------------------

Prefix Engine::new_prefix(std::span<const int32_t> prompt, const std::string& adapter) {
  check_prompt(prompt);
  Prefix p;
  p.adapter = adapter_for(adapter);
  p.cache = model_->new_cache(int64_t(prompt.size()));
  p.logits.resize(size_t(config().vocab_size));
  p.next_pos = int64_t(prompt.size());
  return p;
}

void Engine::sample_first(Prefix& p, const SamplingParams& sampling, int64_t n) const {
  const int64_t V = config().vocab_size;
  for (int64_t i = 0; i < n; ++i) {
    SamplingParams sp = sampling;
    sp.seed = sample_seed(sampling.seed, i);
    auto sampler = std::make_unique<Sampler>(V, sp);
    const int32_t token = sampler->sample(p.logits.data());
    p.tokens.push_back(token);
    p.token_logp.push_back(Sampler::log_prob(p.logits.data(), V, token));
    p.samplers.push_back(std::move(sampler));
  }
}

Prefix Engine::prefill(std::span<const int32_t> prompt, const SamplingParams& sampling,
                       const std::string& adapter) {
  const ExclusiveUse use(*this);
  return prefill_multisampling(prompt, 1, sampling, adapter);
}

Prefix Engine::prefill_multisampling(std::span<const int32_t> prompt, int64_t n,
                                     const SamplingParams& sampling, const std::string& adapter) {
  const ExclusiveUse use(*this);
  if (n < 1 || n > slots())
    throw Error("prefill_multisampling: " + std::to_string(n) +
                " samples requested; between 1 and " + std::to_string(slots()) +
                " (one slot each) are supported");
  Sampler check(config().vocab_size, sampling);  // bad parameters fail before the forward pass
  Prefix p = new_prefix(prompt, adapter);
  model_->forward(prompt, p.cache, p.logits.data(), /*all_logits=*/false, p.adapter.get());
  sample_first(p, sampling, n);
  return p;
}

std::vector<Prefix> Engine::prefill_concat(std::span<const PrefillRequest> requests) {
  const ExclusiveUse use(*this);
  std::vector<Prefix> out;
  out.reserve(requests.size());
  for (const PrefillRequest& r : requests) {
    Sampler check(config().vocab_size, r.sampling);
    out.push_back(new_prefix(r.tokens, r.adapter));
  }
  const int64_t V = config().vocab_size, chunk = model_->max_chunk();
  std::vector<SequenceStep> steps;
  std::vector<size_t> members;
  std::vector<float> logits;
  auto run = [&]() {
    if (steps.empty()) return;
    logits.resize(steps.size() * size_t(V));
    try {
      model_->forward_batch(steps, logits.data());
    } catch (const NonFiniteError& e) {
      throw NonFiniteError("prompt " + std::to_string(members[size_t(e.sequence())]),
                           int64_t(members[size_t(e.sequence())]), e.position());
    }
    for (size_t j = 0; j < members.size(); ++j)
      std::copy_n(logits.begin() + int64_t(j) * V, V, out[members[j]].logits.begin());
    steps.clear();
    members.clear();
  };
  int64_t packed = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const int64_t n = int64_t(requests[i].tokens.size());
    if (n > chunk) {  // more than one pass on its own
      try {
        model_->forward(requests[i].tokens, out[i].cache, out[i].logits.data(), false,
                        out[i].adapter.get());
      } catch (const NonFiniteError& e) {
        throw NonFiniteError("prompt " + std::to_string(i), int64_t(i), e.position());
      }
      continue;
    }
    if (packed + n > chunk) {
      run();
      packed = 0;
    }
    steps.push_back({requests[i].tokens, &out[i].cache, out[i].adapter.get()});
    members.push_back(i);
    packed += n;
  }
  run();
  for (size_t i = 0; i < requests.size(); ++i) sample_first(out[i], requests[i].sampling, 1);
  return out;
}

// --- decode slots ----------------------------------------------------------------------------

const Engine::Slot& Engine::slot_state(int64_t slot) const {
  if (slot < 0 || slot >= slots())
    throw Error("slot " + std::to_string(slot) + " does not exist (the engine has " +
                std::to_string(slots()) + ")");
  return slots_[size_t(slot)];
}

FinishReason Engine::finish_of(const Slot& s, int32_t token) const {
  const SamplingParams& p = s.sampler->params();
  if (std::find(p.stop_tokens.begin(), p.stop_tokens.end(), token) != p.stop_tokens.end())
    return FinishReason::Stop;
  if (p.max_new_tokens > 0 && s.produced >= p.max_new_tokens) return FinishReason::Length;
  if (s.cache.length >= s.cache.capacity) return FinishReason::Context;
  return FinishReason::None;
}

SlotToken Engine::place(Prefix& p, size_t sample, int64_t slot) {
  slot_state(slot);
  Slot& s = slots_[size_t(slot)];
  if (s.busy) throw StateError("insert: slot " + std::to_string(slot) + " is busy");
  copy_cache(p.cache, s.cache);
  s.sampler = std::move(p.samplers[sample]);
  s.adapter = p.adapter;
  s.last_token = p.tokens[sample];
  s.produced = 1;
  s.busy = true;
  s.finish = finish_of(s, s.last_token);
  return {slot, s.last_token, p.token_logp[sample], s.finish};
}

SlotToken Engine::insert(Prefix&& prefix, int64_t slot) {
  const ExclusiveUse use(*this);
  if (prefix.samplers.size() != 1)
    throw Error("insert: the prefix holds " + std::to_string(prefix.samplers.size()) +
                " samples; use bulk_insert");
  return place(prefix, 0, slot);
}

std::vector<SlotToken> Engine::bulk_insert(Prefix&& prefix, std::span<const int64_t> slots) {
  const ExclusiveUse use(*this);
  if (slots.size() != prefix.samplers.size())
    throw Error("bulk_insert: " + std::to_string(slots.size()) + " slots for a prefix of " +
                std::to_string(prefix.samplers.size()) + " samples");
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slot_state(slots[i]).busy)
      throw StateError("bulk_insert: slot " + std::to_string(slots[i]) + " is busy");
    for (size_t j = 0; j < i; ++j)
      if (slots[j] == slots[i])
        throw Error("bulk_insert: slot " + std::to_string(slots[i]) + " is given twice");
  }
  std::vector<SlotToken> out;
  for (size_t i = 0; i < slots.size(); ++i) out.push_back(place(prefix, i, slots[i]));
  return out;
}

std::span<const SlotToken> Engine::generate() {
  const ExclusiveUse use(*this);
  steps_.clear();
  step_slot_.clear();
  step_tokens_.clear();
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (!s.busy || s.finish != FinishReason::None) continue;
    steps_.push_back({std::span<const int32_t>(&s.last_token, 1), &s.cache, s.adapter.get()});
    step_slot_.push_back(int64_t(i));
  }
  if (steps_.empty()) return {};
  try {
    model_->forward_batch(steps_, step_logits_.data());
  } catch (const NonFiniteError& e) {
    const int64_t slot = step_slot_[size_t(e.sequence())];
    throw NonFiniteError("slot " + std::to_string(slot), slot, e.position());
  }
  const int64_t V = config().vocab_size;
  const int64_t n = int64_t(steps_.size());
  step_tokens_.resize(size_t(n));
  auto sample = [&](int64_t j) {
    Slot& s = slots_[size_t(step_slot_[size_t(j)])];
    const float* logits = step_logits_.data() + j * V;
    s.last_token = s.sampler->sample(logits);
    s.produced += 1;
    s.finish = finish_of(s, s.last_token);
    step_tokens_[size_t(j)] = {step_slot_[size_t(j)], s.last_token,
                               Sampler::log_prob(logits, V, s.last_token), s.finish};
  };
  // Each slot samples from its own logits with its own generator, so the slots can go in
  // parallel and the results do not depend on the thread count. Nothing in there throws or
  // allocates.
  ops::run_each(n, n == 1 ? 1 : ops::max_threads(), sample);
  return step_tokens_;
}

void Engine::release(int64_t slot) {
  const ExclusiveUse use(*this);
  slot_state(slot);
  Slot& s = slots_[size_t(slot)];
  if (!s.busy) throw StateError("release: slot " + std::to_string(slot) + " is not in use");
  s.busy = false;
  s.finish = FinishReason::None;
  s.adapter.reset();
  s.sampler.reset();
  s.cache.length = 0;
  s.produced = 0;
}

void Engine::check_request(std::span<const int32_t> prompt, const SamplingParams& sampling) const {
  check_prompt(prompt);
  Sampler(config().vocab_size, sampling);  // throws for parameters its algorithm refuses
}

void Engine::check_prompt(std::span<const int32_t> prompt) const {
  if (prompt.empty()) throw Error("prompt is empty");
  // Compared unsigned, before any token is read: a length of 2^63 or more is no negative number.
  if (prompt.size() > size_t(max_seq_len_))
    throw Error("prompt has " + std::to_string(prompt.size()) +
                " tokens, longer than the context of " + std::to_string(max_seq_len_));
  const int64_t V = config().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= V)
      throw Error("prompt token " + std::to_string(i) + " is id " + std::to_string(prompt[i]) +
                  ", outside the vocabulary [0, " + std::to_string(V) + ")");
}

// --- reference tooling -----------------------------------------------------------------------

void Engine::prefill_logits(std::span<const int32_t> prompt, float* out,
                            const std::string& adapter) {
  const ExclusiveUse use(*this);
  check_prompt(prompt);
  const auto a = adapter_for(adapter);
  scratch_cache_.length = 0;
  model_->forward(prompt, scratch_cache_, out, /*all_logits=*/true, a.get());
}

std::vector<float> Engine::calibrate_max_logits(const std::vector<std::vector<int32_t>>& prompts) {
  const ExclusiveUse use(*this);
  const ModelConfig& c = config();
  std::vector<float> max(size_t(c.num_decoder_layers * c.num_query_heads),
                         -std::numeric_limits<float>::infinity());
  std::vector<float> logits(size_t(c.vocab_size));
  model_->record_max_logits(max.data());
  try {
    for (size_t i = 0; i < prompts.size(); ++i) {
      try {
        check_prompt(prompts[i]);
      } catch (const Error& e) {
        throw Error("calibration prompt " + std::to_string(i + 1) + ": " + e.what());
      }
      scratch_cache_.length = 0;
      try {
        model_->forward(prompts[i], scratch_cache_, logits.data(), /*all_logits=*/false);
      } catch (const NonFiniteError& e) {
        throw NonFiniteError("calibration prompt " + std::to_string(i + 1), int64_t(i),
                             e.position());
      }
    }
  } catch (...) {
    model_->record_max_logits(nullptr);
    throw;
  }
  model_->record_max_logits(nullptr);
  scratch_cache_.length = 0;
  return max;
}

}  // namespace kiln
