#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"

namespace kiln::cli {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double peak_rss_mib() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;  // Linux reports KiB
}

}  // namespace

int cmd_bench(int argc, const char* const* argv) {
  ArgParser p("kiln bench",
              "Measures load time, prefill and decode tokens/s (medians over --repeat runs) and "
              "peak resident memory on a seeded pseudo-random prompt.");
  p.positional("DIR", "artifact directory");
  p.option("--prompt-tokens", "N", "prompt length for the prefill measurement", "512");
  p.option("--gen-tokens", "N", "tokens generated for the decode measurement", "128");
  p.option("--repeat", "R", "runs; the medians are reported", "3");
  add_engine_options(p);
  p.flag("--json", "print one JSON object");
  Args a = p.parse(argc, argv);
  int64_t n_prompt = a.get_int("--prompt-tokens", 1, 1 << 24);
  int64_t n_gen = a.get_int("--gen-tokens", 1, 1 << 24);
  int64_t repeat = a.get_int("--repeat", 1, 1000);

  double t0 = now_seconds();
  EngineOptions eo = engine_options(a);
  auto engine = Engine::open(a.positional(0), eo);
  double t_load = now_seconds() - t0;
  if (n_prompt + n_gen > engine->max_seq_len())
    throw Error("--prompt-tokens + --gen-tokens = " + std::to_string(n_prompt + n_gen) +
                " exceeds the model's context of " + std::to_string(engine->max_seq_len()));

  Rng rng(42);
  std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
  for (auto& t : prompt) t = int32_t(rng.next() % uint64_t(engine->config().vocab_size));

  std::vector<double> prefill_tps, decode_tps;
  for (int64_t r = 0; r < repeat; ++r) {
    double t1 = now_seconds();
    engine->prefill(prompt, SamplingParams{});
    double t2 = now_seconds();
    for (int64_t i = 0; i < n_gen; ++i) engine->generate();
    double t3 = now_seconds();
    prefill_tps.push_back(double(n_prompt) / (t2 - t1));
    decode_tps.push_back(double(n_gen) / (t3 - t2));
    if (!a.has("--json"))
      std::fprintf(stderr, "run %lld/%lld: prefill %.1f tokens/s, decode %.2f tokens/s\n",
                   static_cast<long long>(r + 1), static_cast<long long>(repeat),
                   prefill_tps.back(), decode_tps.back());
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
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("load          %.3f s\n", t_load);
  std::printf("prefill       %.1f tokens/s   (%lld-token prompt, median of %lld)\n",
              median(prefill_tps), static_cast<long long>(n_prompt),
              static_cast<long long>(repeat));
  std::printf("decode        %.2f tokens/s   (%lld tokens, median of %lld)\n", median(decode_tps),
              static_cast<long long>(n_gen), static_cast<long long>(repeat));
  std::printf("peak RSS      %.0f MiB\n", peak_rss_mib());
  return 0;
}

}  // namespace kiln::cli
