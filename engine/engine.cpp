#include "engine/engine.h"

#include <limits>

#include "common/error.h"
#include "common/mapped_file.h"
#include "schema/format.h"

namespace kiln {

std::unique_ptr<Engine> Engine::open(const std::string& dir, const EngineOptions& opt) {
  auto model = Model::open(dir, opt.model);
  int64_t ctx = model->config().max_target_length;
  if (opt.max_seq_len > ctx)
    throw Error(dir + ": requested context " + std::to_string(opt.max_seq_len) +
                " exceeds the model's max_target_length " + std::to_string(ctx));
  if (opt.slots < 0 || opt.slots > model->max_chunk())
    throw Error(dir + ": " + std::to_string(opt.slots) + " decode slots requested; between 0 and " +
                std::to_string(model->max_chunk()) + " (max_chunk) are supported");
  return std::unique_ptr<Engine>(
      new Engine(std::move(model), opt.max_seq_len > 0 ? opt.max_seq_len : ctx, opt.slots));
}

Engine::Engine(std::unique_ptr<Model> m, int64_t max_seq_len, int64_t slots)
    : model_(std::move(m)),
      cache_(model_->new_cache(max_seq_len)),
      logits_(size_t(model_->config().vocab_size)) {
  slots_.resize(size_t(slots));
  for (Slot& s : slots_) s.cache = model_->new_cache(max_seq_len);
  steps_.reserve(size_t(slots));
  step_slot_.reserve(size_t(slots));
  slot_logits_.resize(size_t(slots * model_->config().vocab_size));
}

const LoraAdapter& Engine::load_adapter(const std::string& name) {
  if (auto it = adapters_.find(name); it != adapters_.end()) return *it->second;
  const std::string& dir = model_->artifact().dir();
  const std::string mpath = dir + "/" + kManifestFile;
  MappedFile mf(mpath);
  Manifest m = parse_manifest(mf.data(), mf.size(), mpath);
  const AdapterRecord* rec = m.find_adapter(name);
  if (!rec) {
    std::string names;
    for (const auto& a : m.adapters)
      if (!a.merged) names += (names.empty() ? "" : ", ") + a.name;
    throw Error(dir + ": no adapter named '" + name + "' (" +
                (names.empty() ? std::string("the artifact has none") : "it has: " + names) + ")");
  }
  auto adapter = LoraAdapter::open(dir, config(), *rec, /*verify_checksums=*/false);
  model_->reserve_lora(adapter->max_rank());
  return *adapters_.emplace(name, std::move(adapter)).first->second;
}

void Engine::unload_adapter(const std::string& name) {
  auto it = adapters_.find(name);
  if (it == adapters_.end()) throw Error("unload_adapter: adapter '" + name + "' is not loaded");
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].active && slots_[i].adapter == it->second)
      throw Error("unload_adapter: adapter '" + name + "' is in use by slot " + std::to_string(i));
  if (adapter_ == it->second) adapter_.reset();
  adapters_.erase(it);
}

std::vector<std::string> Engine::loaded_adapters() const {
  std::vector<std::string> names;
  for (const auto& [name, a] : adapters_) names.push_back(name);
  return names;
}

const LoraAdapter* Engine::adapter_for(const std::string& name) const {
  if (name.empty()) return nullptr;
  auto it = adapters_.find(name);
  if (it == adapters_.end())
    throw Error("adapter '" + name + "' is not loaded (load_adapter first)");
  return it->second.get();
}

int32_t Engine::insert(int64_t slot, std::span<const int32_t> prompt,
                       const SamplingParams& sampling, const std::string& adapter) {
  if (slot < 0 || slot >= slots())
    throw Error("insert: slot " + std::to_string(slot) + " does not exist (the engine has " +
                std::to_string(slots()) + ")");
  Slot& s = slots_[size_t(slot)];
  if (s.active) throw Error("insert: slot " + std::to_string(slot) + " is busy");
  check_prompt(prompt);
  const LoraAdapter* a = adapter_for(adapter);
  auto sampler = std::make_unique<Sampler>(config().vocab_size, sampling);
  s.cache.length = 0;
  model_->forward(prompt, s.cache, logits_.data(), /*all_logits=*/false, a);
  s.sampler = std::move(sampler);
  s.adapter = a ? adapters_.at(adapter) : nullptr;
  s.last_token = s.sampler->sample(logits_.data());
  s.active = true;
  return s.last_token;
}

void Engine::generate_slots(std::span<int32_t> tokens) {
  if (int64_t(tokens.size()) < slots())
    throw Error("generate_slots: room for " + std::to_string(tokens.size()) + " tokens, " +
                std::to_string(slots()) + " slots");
  steps_.clear();
  step_slot_.clear();
  for (size_t i = 0; i < slots_.size(); ++i) {
    tokens[i] = -1;
    Slot& s = slots_[i];
    if (!s.active) continue;
    if (s.cache.length >= s.cache.capacity)
      throw Error("generate_slots: slot " + std::to_string(i) + " has filled its context of " +
                  std::to_string(s.cache.capacity) + " tokens");
    steps_.push_back({std::span<const int32_t>(&s.last_token, 1), &s.cache, s.adapter.get()});
    step_slot_.push_back(int64_t(i));
  }
  if (steps_.empty()) return;
  model_->forward_batch(steps_, slot_logits_.data());
  const int64_t V = config().vocab_size;
  for (size_t j = 0; j < steps_.size(); ++j) {
    Slot& s = slots_[size_t(step_slot_[j])];
    s.last_token = s.sampler->sample(slot_logits_.data() + int64_t(j) * V);
    tokens[size_t(step_slot_[j])] = s.last_token;
  }
}

void Engine::release(int64_t slot) {
  if (slot < 0 || slot >= slots())
    throw Error("release: slot " + std::to_string(slot) + " does not exist");
  Slot& s = slots_[size_t(slot)];
  s.active = false;
  s.adapter.reset();
  s.sampler.reset();
  s.cache.length = 0;
}

void Engine::check_prompt(std::span<const int32_t> prompt) const {
  if (prompt.empty()) throw Error("prompt is empty");
  if (int64_t(prompt.size()) > cache_.capacity)
    throw Error("prompt has " + std::to_string(prompt.size()) +
                " tokens, longer than the context of " + std::to_string(cache_.capacity));
  const int64_t V = config().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= V)
      throw Error("prompt token " + std::to_string(i) + " is id " + std::to_string(prompt[i]) +
                  ", outside the vocabulary [0, " + std::to_string(V) + ")");
}

int32_t Engine::prefill(std::span<const int32_t> prompt, const SamplingParams& sampling,
                        const std::string& adapter) {
  check_prompt(prompt);
  const LoraAdapter* a = adapter_for(adapter);
  sampler_ = std::make_unique<Sampler>(config().vocab_size, sampling);
  adapter_ = a ? adapters_.at(adapter) : nullptr;
  cache_.length = 0;
  model_->forward(prompt, cache_, logits_.data(), /*all_logits=*/false, a);
  last_token_ = sampler_->sample(logits_.data());
  return last_token_;
}

int32_t Engine::generate() {
  if (!sampler_) throw Error("generate() called before prefill()");
  if (cache_.length >= cache_.capacity)
    throw Error("context of " + std::to_string(cache_.capacity) + " tokens is full");
  model_->forward(std::span<const int32_t>(&last_token_, 1), cache_, logits_.data(), false,
                  adapter_.get());
  last_token_ = sampler_->sample(logits_.data());
  return last_token_;
}

void Engine::prefill_logits(std::span<const int32_t> prompt, float* out,
                            const std::string& adapter) {
  check_prompt(prompt);
  const LoraAdapter* a = adapter_for(adapter);
  cache_.length = 0;
  model_->forward(prompt, cache_, out, /*all_logits=*/true, a);
  const int64_t V = config().vocab_size;
  std::copy(out + (int64_t(prompt.size()) - 1) * V, out + int64_t(prompt.size()) * V,
            logits_.begin());
}

std::vector<float> Engine::calibrate_max_logits(const std::vector<std::vector<int32_t>>& prompts) {
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
      cache_.length = 0;
      model_->forward(prompts[i], cache_, logits.data(), /*all_logits=*/false);
    }
  } catch (...) {
    model_->record_max_logits(nullptr);
    throw;
  }
  model_->record_max_logits(nullptr);
  cache_.length = 0;
  sampler_.reset();
  return max;
}

}  // namespace kiln
