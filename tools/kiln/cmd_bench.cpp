#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "common/process_stats.h"
#include "engine/benchmark.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"
#include "tools/kiln/contention.h"

namespace kiln::cli {

namespace {

// Engine::open's time outside the model's named phases.
double other_startup_seconds(const BenchmarkResult& r) {
  const StartupTimes& t = r.startup;
  return r.load_seconds - t.open_seconds - t.verify_seconds - t.relayout_seconds -
         t.primitive_seconds;
}

}  // namespace

int cmd_bench(int argc, const char* const* argv) {
  ArgParser p("kiln bench",
              "Measures start-up (the open's phases: mappings, checksums, re-layout, oneDNN "
              "primitives; then the first token of a 4-token prompt), prefill and decode "
              "tokens/s (medians over --repeat runs) and peak resident memory on a seeded "
              "pseudo-random prompt. With --adapter, also what "
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
  p.option("--contend", "SPEC",
           "run competing processes during the whole measurement and stop them after: "
           "KIND[:COUNT][:nice=N][:threads=T],... with KIND busy, stream, faults or omp (see "
           "`kiln contend --help`), e.g. busy:3:nice=19");
  add_engine_options(p);
  p.flag("--json", "print one JSON object");
  Args a = p.parse(argc, argv);
  BenchmarkOptions bo;
  bo.prompt_tokens = a.get_int("--prompt-tokens", 1, 1 << 24);
  bo.gen_tokens = a.get_int("--gen-tokens", 1, 1 << 24);
  bo.repeat = a.get_int("--repeat", 1, 1000);
  if (a.has("--slots")) {
    for (int32_t n : a.get_token_list("--slots")) {
      if (n < 1 || n > ModelOptions{}.max_chunk)
        throw a.error("--slots takes slot counts from 1 to " +
                      std::to_string(ModelOptions{}.max_chunk) + ", e.g. 1,4,16");
      bo.slot_counts.push_back(n);
    }
  }
  if (a.has("--adapter")) bo.adapter = a.get("--adapter");
  if (!a.has("--json"))
    bo.progress = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  const std::vector<LoadItem> load =
      a.has("--contend") ? parse_contention(a.get("--contend")) : std::vector<LoadItem>{};
  const BenchmarkResult r = [&] {
    const Contention running(load);
    return run_benchmark(a.positional(0), engine_options(a), bo);
  }();
  const std::optional<AdapterLoad>& adapter = r.adapter;

  if (a.has("--json")) {
    nlohmann::ordered_json j = {{"model", r.model},
                                {"threads", r.threads},
                                {"prompt_tokens", bo.prompt_tokens},
                                {"gen_tokens", bo.gen_tokens},
                                {"repeat", bo.repeat},
                                {"contend", describe_contention(load)},
                                {"load_seconds", r.load_seconds},
                                {"startup",
                                 {{"first_token_seconds", r.first_token_seconds},
                                  {"open_seconds", r.load_seconds},
                                  {"mapping_seconds", r.startup.open_seconds},
                                  {"checksum_seconds", r.startup.verify_seconds},
                                  {"relayout_seconds", r.startup.relayout_seconds},
                                  {"primitive_seconds", r.startup.primitive_seconds},
                                  {"other_seconds", other_startup_seconds(r)}}},
                                {"prefill_tokens_per_s", median(r.prefill_tokens_per_s)},
                                {"decode_tokens_per_s", median(r.decode_tokens_per_s)},
                                {"prefill_runs", r.prefill_tokens_per_s},
                                {"decode_runs", r.decode_tokens_per_s},
                                {"decode_threads_runs", r.decode_threads},
                                {"peak_rss_mib", peak_rss_mib()}};
    if (!r.batched.empty()) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const BatchedDecode& b : r.batched)
        list.push_back({{"slots", b.slots},
                        {"decode_tokens_per_s", median(b.tokens_per_s)},
                        {"decode_runs", b.tokens_per_s},
                        {"speedup_vs_one_slot", median(b.speedup)},
                        {"speedup_runs", b.speedup}});
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
  if (!load.empty()) std::printf("contended by  %s\n", describe_contention(load).c_str());
  std::printf("load          %.3f s\n", r.load_seconds);
  std::printf(
      "start-up      first token %.3f s: open %.3f s (mappings %.3f, checksums %.3f, re-layout "
      "%.3f, primitives %.3f, other %.3f), first pass %.3f s\n",
      r.first_token_seconds, r.load_seconds, r.startup.open_seconds, r.startup.verify_seconds,
      r.startup.relayout_seconds, r.startup.primitive_seconds, other_startup_seconds(r),
      r.first_token_seconds - r.load_seconds);
  if (adapter)
    std::printf(
        "adapter       '%s' (rank %lld, %.1f MiB): loaded in %.4f s, resident %.0f -> "
        "%.0f MiB, %lld major page faults\n",
        adapter->name.c_str(), static_cast<long long>(adapter->rank),
        double(adapter->bytes) / (1024.0 * 1024.0), adapter->seconds, adapter->rss_before_mib,
        adapter->rss_after_mib, adapter->major_faults);
  std::printf("prefill       %.1f tokens/s   (%lld-token prompt, median of %lld)\n",
              median(r.prefill_tokens_per_s), static_cast<long long>(bo.prompt_tokens),
              static_cast<long long>(bo.repeat));
  std::printf("decode        %.2f tokens/s   (%lld tokens, median of %lld)\n",
              median(r.decode_tokens_per_s), static_cast<long long>(bo.gen_tokens),
              static_cast<long long>(bo.repeat));
  for (const BatchedDecode& b : r.batched)
    std::printf(
        "decode        %.2f tokens/s with %lld slots (%.2f per slot; %.2fx one slot, "
        "median of per-run ratios)\n",
        median(b.tokens_per_s), static_cast<long long>(b.slots),
        median(b.tokens_per_s) / double(b.slots), median(b.speedup));
  std::printf("peak RSS      %.0f MiB\n", peak_rss_mib());
  return 0;
}

}  // namespace kiln::cli
