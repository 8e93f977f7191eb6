#include "engine/engine.h"

#include <limits>

#include "common/error.h"

namespace kiln {

std::unique_ptr<Engine> Engine::open(const std::string& dir, const EngineOptions& opt) {
  auto model = Model::open(dir, opt.model);
  int64_t ctx = model->config().max_target_length;
  if (opt.max_seq_len > ctx)
    throw Error(dir + ": requested context " + std::to_string(opt.max_seq_len) +
                " exceeds the model's max_target_length " + std::to_string(ctx));
  return std::unique_ptr<Engine>(
      new Engine(std::move(model), opt.max_seq_len > 0 ? opt.max_seq_len : ctx));
}

Engine::Engine(std::unique_ptr<Model> m, int64_t max_seq_len)
    : model_(std::move(m)),
      cache_(model_->new_cache(max_seq_len)),
      logits_(size_t(model_->config().vocab_size)) {}

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

int32_t Engine::prefill(std::span<const int32_t> prompt, const SamplingParams& sampling) {
  check_prompt(prompt);
  sampler_ = std::make_unique<Sampler>(config().vocab_size, sampling);
  cache_.length = 0;
  model_->forward(prompt, cache_, logits_.data(), /*all_logits=*/false);
  last_token_ = sampler_->sample(logits_.data());
  return last_token_;
}

int32_t Engine::generate() {
  if (!sampler_) throw Error("generate() called before prefill()");
  if (cache_.length >= cache_.capacity)
    throw Error("context of " + std::to_string(cache_.capacity) + " tokens is full");
  model_->forward(std::span<const int32_t>(&last_token_, 1), cache_, logits_.data(), false);
  last_token_ = sampler_->sample(logits_.data());
  return last_token_;
}

void Engine::prefill_logits(std::span<const int32_t> prompt, float* out) {
  check_prompt(prompt);
  cache_.length = 0;
  model_->forward(prompt, cache_, out, /*all_logits=*/true);
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
