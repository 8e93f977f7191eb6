// The measurement behind `kiln bench`: load an artifact, then time prefill and decode of a seeded
// pseudo-random prompt over several runs, and optionally batched decode with several slot counts
// taking turns within each run (so that every ratio compares runs from the same minute of a noisy
// machine). Medians are what the CLI reports; every run is kept.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/runner.h"

namespace kiln {

struct BenchmarkOptions {
  int64_t prompt_tokens = 512;
  int64_t gen_tokens = 128;
  int64_t repeat = 3;
  // Batched decode: for each count N, N slots hold the same prompt (N samples of one prefill)
  // and every generate() step advances all of them. Each count is in [1, ModelOptions::max_chunk].
  std::vector<int64_t> slot_counts;
  std::string adapter;  // a run-time adapter to load after the base and run with, or empty
  // Called after each run with a line such as "run 1/3: prefill 812.3 tokens/s, …".
  std::function<void(const std::string&)> progress;
};

struct BatchedDecode {
  int64_t slots = 0;
  std::vector<double> tokens_per_s;  // per run
  std::vector<double> speedup;       // per run, against that run's single-slot decode
};

struct BenchmarkResult {
  double load_seconds = 0;  // Engine::open, checksums included
  StartupTimes startup;     // where Engine::open spent its time
  // Engine::open and then a 4-token prompt's first token, as a fresh `kiln run` would get it
  // (without the process's own start: loading the program and its libraries).
  double first_token_seconds = 0;
  int threads = 0;
  std::string model;  // the model name, or the decoder block when the config has none
  std::optional<AdapterLoad> adapter;
  std::vector<double> prefill_tokens_per_s;  // per run
  std::vector<double> decode_tokens_per_s;   // per run
  std::vector<int> decode_threads;           // per run: the thread governor's count at its end
  std::vector<BatchedDecode> batched;
};

// Opens `dir` with `engine_options` (its slots raised to the largest slot count) and measures.
// Throws kiln::Error for bad options (a slot count out of range, a prompt plus generation longer
// than the model's context) and everything Engine::open throws.
BenchmarkResult run_benchmark(const std::string& dir, EngineOptions engine_options,
                              const BenchmarkOptions& options);

}  // namespace kiln
