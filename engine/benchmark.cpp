#include "engine/benchmark.h"

#include <algorithm>
#include <cstdio>

#include "common/error.h"
#include "engine/sampling.h"

namespace kiln {

namespace {

std::string format(const char* fmt, auto... args) {
  char buf[160];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

}  // namespace

BenchmarkResult run_benchmark(const std::string& dir, EngineOptions engine_options,
                              const BenchmarkOptions& options) {
  const int64_t max_slots = ModelOptions{}.max_chunk;
  engine_options.slots = 1;
  for (int64_t n : options.slot_counts) {
    if (n < 1 || n > max_slots)
      throw Error("slot counts go from 1 to " + std::to_string(max_slots) + ", got " +
                  std::to_string(n));
    engine_options.slots = std::max(engine_options.slots, n);
  }
  const auto report = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };

  BenchmarkResult res;
  const double t0 = now_seconds();
  auto engine = Engine::open(dir, engine_options);
  res.load_seconds = now_seconds() - t0;
  res.threads = engine_options.model.threads;
  const ModelConfig& c = engine->config();
  res.model = c.model_name.empty() ? c.decoder_block : c.model_name;
  const int64_t n_prompt = options.prompt_tokens, n_gen = options.gen_tokens;
  if (n_prompt < 1 || n_gen < 1 || n_prompt + n_gen > engine->max_seq_len())
    throw Error("prompt tokens + generated tokens = " + std::to_string(n_prompt + n_gen) +
                " must be within the model's context of " + std::to_string(engine->max_seq_len()));
  res.startup = engine->model().startup_times();
  SamplingParams greedy;
  greedy.max_new_tokens = 1;
  Runner(*engine).run({{{1, 2, 3, 4}, ""}}, greedy);  // what a fresh `kiln run` waits for
  res.first_token_seconds = now_seconds() - t0;

  if (!options.adapter.empty()) res.adapter = load_adapter_measured(*engine, options.adapter);

  Rng rng(42);
  std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
  for (auto& t : prompt) t = int32_t(rng.next() % uint64_t(c.vocab_size));

  greedy.max_new_tokens = n_gen + 1;  // the prefill's token, then n_gen decode steps
  Runner runner(*engine);
  const std::vector<GenerationRequest> request = {{prompt, options.adapter}};
  for (int64_t r = 0; r < options.repeat; ++r) {
    runner.run(request, greedy);
    res.prefill_tokens_per_s.push_back(runner.stats().prefill_tokens_per_s());
    res.decode_tokens_per_s.push_back(runner.stats().decode_tokens_per_s());
    res.decode_threads.push_back(engine->model().decode_threads());
    report(
        format("run %lld/%lld: prefill %.1f tokens/s, decode %.2f tokens/s (on %d threads at "
               "the end)",
               static_cast<long long>(r + 1), static_cast<long long>(options.repeat),
               res.prefill_tokens_per_s.back(), res.decode_tokens_per_s.back(),
               res.decode_threads.back()));
  }

  for (int64_t n : options.slot_counts) res.batched.push_back({n, {}, {}});
  for (int64_t r = 0; r < options.repeat; ++r) {
    for (BatchedDecode& b : res.batched) {
      RunOptions samples;
      samples.samples = b.slots;
      runner.run(request, greedy, samples);
      b.tokens_per_s.push_back(runner.stats().decode_tokens_per_s());
      report(format("slots %lld, run %lld/%lld: decode %.2f tokens/s",
                    static_cast<long long>(b.slots), static_cast<long long>(r + 1),
                    static_cast<long long>(options.repeat), b.tokens_per_s.back()));
    }
    // One slot of the batched path if measured in this run, else the plain decode run.
    double one = res.decode_tokens_per_s[size_t(r)];
    for (const BatchedDecode& b : res.batched)
      if (b.slots == 1) one = b.tokens_per_s.back();
    for (BatchedDecode& b : res.batched) b.speedup.push_back(b.tokens_per_s.back() / one);
  }
  return res;
}

}  // namespace kiln
