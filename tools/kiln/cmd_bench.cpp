#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "common/process_stats.h"
#include "engine/runner.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

int cmd_bench(int argc, const char* const* argv) {
  ArgParser p("kiln bench",
              "Measures load time, prefill and decode tokens/s (medians over --repeat runs) and "
              "peak resident memory on a seeded pseudo-random prompt. With --adapter, also what "
              "loading that run-time adapter into the open engine costs (time, resident memory), "
              "and the runs use it.");
  p.positional("DIR", "artifact directory");
  p.option("--prompt-tokens", "N", "prompt length for the prefill measurement", "512");
  p.option("--gen-tokens", "N", "tokens generated for the decode measurement", "128");
  p.option("--repeat", "R", "runs; the medians are reported", "3");
  p.option("--adapter", "NAME", "load this run-time adapter after the base and run with it");
  p.option(
      "--slots", "LIST",
      "also measure batched decode with this many active slots, e.g. 1,4,16 (each holds the "
      "prompt; one generate step advances all; the counts take turns within each repeat and the "
      "speed-up is the median of per-repeat ratios to one slot)");
  add_engine_options(p);
  p.flag("--json", "print one JSON object");
  Args a = p.parse(argc, argv);
  int64_t n_prompt = a.get_int("--prompt-tokens", 1, 1 << 24);
  int64_t n_gen = a.get_int("--gen-tokens", 1, 1 << 24);
  int64_t repeat = a.get_int("--repeat", 1, 1000);

  std::vector<int64_t> slot_counts;
  if (a.has("--slots")) {
    for (int32_t n : a.get_token_list("--slots")) {
      if (n < 1 || n > ModelOptions{}.max_chunk)
        throw a.error("--slots takes slot counts from 1 to " +
                      std::to_string(ModelOptions{}.max_chunk) + ", e.g. 1,4,16");
      slot_counts.push_back(n);
    }
  }

  double t0 = now_seconds();
  EngineOptions eo = engine_options(a);
  eo.slots = 1;
  for (int64_t n : slot_counts) eo.slots = std::max(eo.slots, n);
  auto engine = Engine::open(a.positional(0), eo);
  double t_load = now_seconds() - t0;
  if (n_prompt + n_gen > engine->max_seq_len())
    throw Error("--prompt-tokens + --gen-tokens = " + std::to_string(n_prompt + n_gen) +
                " exceeds the model's context of " + std::to_string(engine->max_seq_len()));

  std::optional<AdapterLoad> adapter;
  if (a.has("--adapter")) adapter = load_adapter_measured(*engine, a.get("--adapter"));
  const std::string adapter_name = adapter ? adapter->name : std::string();

  Rng rng(42);
  std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
  for (auto& t : prompt) t = int32_t(rng.next() % uint64_t(engine->config().vocab_size));

  std::vector<double> prefill_tps, decode_tps;
  SamplingParams greedy;
  greedy.max_new_tokens = n_gen + 1;  // the prefill's token, then n_gen decode steps
  Runner runner(*engine);
  const std::vector<GenerationRequest> request = {{prompt, adapter_name}};
  for (int64_t r = 0; r < repeat; ++r) {
    runner.run(request, greedy);
    prefill_tps.push_back(runner.stats().prefill_tokens_per_s());
    decode_tps.push_back(runner.stats().decode_tokens_per_s());
    if (!a.has("--json"))
      std::fprintf(stderr, "run %lld/%lld: prefill %.1f tokens/s, decode %.2f tokens/s\n",
                   static_cast<long long>(r + 1), static_cast<long long>(repeat),
                   prefill_tps.back(), decode_tps.back());
  }

  // Batched decode: N slots hold the same prompt (N samples of one prefill) and every generate()
  // step advances all of them in one batched pass. The slot counts take turns within each
  // repeat, so every ratio compares runs from the same minute of a noisy machine.
  struct SlotRun {
    int64_t slots;
    std::vector<double> tps;
    std::vector<double> speedup;  // per repeat, against that repeat's single-slot run
  };
  std::vector<SlotRun> slot_runs;
  for (int64_t n : slot_counts) slot_runs.push_back({n, {}, {}});
  for (int64_t r = 0; r < repeat; ++r) {
    for (SlotRun& sr : slot_runs) {
      RunOptions samples;
      samples.samples = sr.slots;
      runner.run(request, greedy, samples);
      sr.tps.push_back(runner.stats().decode_tokens_per_s());
      if (!a.has("--json"))
        std::fprintf(stderr, "slots %lld, run %lld/%lld: decode %.2f tokens/s\n",
                     static_cast<long long>(sr.slots), static_cast<long long>(r + 1),
                     static_cast<long long>(repeat), sr.tps.back());
    }
    // One slot of the batched path if measured in this repeat, else the plain decode run.
    double one = decode_tps[size_t(r)];
    for (const SlotRun& sr : slot_runs)
      if (sr.slots == 1) one = sr.tps.back();
    for (SlotRun& sr : slot_runs) sr.speedup.push_back(sr.tps.back() / one);
  }
  const ModelConfig& c = engine->config();
  if (a.has("--json")) {
    nlohmann::ordered_json j = {{"model", c.model_name.empty() ? c.decoder_block : c.model_name},
                                {"threads", eo.model.threads},
                                {"prompt_tokens", n_prompt},
                                {"gen_tokens", n_gen},
                                {"repeat", repeat},
                                {"load_seconds", t_load},
                                {"prefill_tokens_per_s", median(prefill_tps)},
                                {"decode_tokens_per_s", median(decode_tps)},
                                {"prefill_runs", prefill_tps},
                                {"decode_runs", decode_tps},
                                {"peak_rss_mib", peak_rss_mib()}};
    if (!slot_runs.empty()) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const SlotRun& sr : slot_runs)
        list.push_back({{"slots", sr.slots},
                        {"decode_tokens_per_s", median(sr.tps)},
                        {"decode_runs", sr.tps},
                        {"speedup_vs_one_slot", median(sr.speedup)},
                        {"speedup_runs", sr.speedup}});
      j["batched_decode"] = list;
    }
    if (adapter)
      j["adapter"] = {{"name", adapter->name},
                      {"rank", adapter->rank},
                      {"bytes", adapter->bytes},
                      {"load_seconds", adapter->seconds},
                      {"rss_before_mib", adapter->rss_before_mib},
                      {"rss_after_mib", adapter->rss_after_mib},
                      {"major_faults", adapter->major_faults}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("load          %.3f s\n", t_load);
  if (adapter)
    std::printf(
        "adapter       '%s' (rank %lld, %.1f MiB): loaded in %.4f s, resident %.0f -> "
        "%.0f MiB, %lld major page faults\n",
        adapter->name.c_str(), static_cast<long long>(adapter->rank),
        double(adapter->bytes) / (1024.0 * 1024.0), adapter->seconds, adapter->rss_before_mib,
        adapter->rss_after_mib, adapter->major_faults);
  std::printf("prefill       %.1f tokens/s   (%lld-token prompt, median of %lld)\n",
              median(prefill_tps), static_cast<long long>(n_prompt),
              static_cast<long long>(repeat));
  std::printf("decode        %.2f tokens/s   (%lld tokens, median of %lld)\n", median(decode_tps),
              static_cast<long long>(n_gen), static_cast<long long>(repeat));
  for (const SlotRun& sr : slot_runs)
    std::printf(
        "decode        %.2f tokens/s with %lld slots (%.2f per slot; %.2fx one slot, "
        "median of per-run ratios)\n",
        median(sr.tps), static_cast<long long>(sr.slots), median(sr.tps) / double(sr.slots),
        median(sr.speedup));
  std::printf("peak RSS      %.0f MiB\n", peak_rss_mib());
  return 0;
}

}  // namespace kiln::cli
