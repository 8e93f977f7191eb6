#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"

namespace kiln::cli {

void add_engine_options(ArgParser& p) {
  p.option("--threads", "N", "worker threads (default: every core)", "0");
  p.flag("--no-relayout", "use the mapped weights in place instead of re-laying them for speed");
  p.flag("--verify", "check every tensor's checksum while loading");
}

EngineOptions engine_options(const Args& a) {
  EngineOptions o;
  o.model.threads = int(a.get_int("--threads", 0, 1024));
  o.model.relayout = !a.has("--no-relayout");
  o.model.verify_checksums = a.has("--verify");
  return o;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int cmd_run(int argc, const char* const* argv) {
  ArgParser p("kiln run", "Prefills a prompt and generates tokens, printing them with timings.");
  p.positional("DIR", "artifact directory");
  p.option("--tokens", "LIST", "prompt token ids, comma-separated", required);
  p.option("--max-tokens", "N", "tokens to generate (the first comes from the prefill)", "32");
  p.option("--temperature", "T", "0 = greedy", "0");
  p.option("--top-k", "K", "keep the K most likely tokens (0 = off)", "0");
  p.option("--top-p", "P", "keep the smallest set with probability >= P (1 = off)", "1");
  p.option("--seed", "S", "sampling seed", "0");
  add_engine_options(p);
  p.flag("--json", "print one JSON object with the tokens and timings");
  Args a = p.parse(argc, argv);

  std::vector<int32_t> prompt = a.get_token_list("--tokens");
  int64_t max_tokens = a.get_int("--max-tokens", 1, 1 << 24);
  SamplingParams sp;
  sp.temperature = float(a.get_double("--temperature", 0, 1e6));
  sp.top_k = int32_t(a.get_int("--top-k", 0, 1 << 30));
  sp.top_p = float(a.get_double("--top-p", 0, 1));
  sp.seed = a.get_u64("--seed");
  if (sp.top_p <= 0) throw a.error("--top-p must be in (0, 1]");

  double t0 = now_seconds();
  auto engine = Engine::open(a.positional(0), engine_options(a));
  double t_load = now_seconds() - t0;
  if (int64_t(prompt.size()) + max_tokens - 1 > engine->max_seq_len())
    throw Error("prompt (" + std::to_string(prompt.size()) + " tokens) + --max-tokens " +
                std::to_string(max_tokens) + " exceeds the context of " +
                std::to_string(engine->max_seq_len()) + " tokens");

  std::vector<int32_t> out;
  out.reserve(size_t(max_tokens));
  double t1 = now_seconds();
  out.push_back(engine->prefill(prompt, sp));
  double t_prefill = now_seconds() - t1;
  double t2 = now_seconds();
  while (int64_t(out.size()) < max_tokens) out.push_back(engine->generate());
  double t_decode = now_seconds() - t2;
  int64_t decoded = max_tokens - 1;

  double prefill_tps = double(prompt.size()) / t_prefill;
  double decode_tps = decoded > 0 ? double(decoded) / t_decode : 0.0;
  if (a.has("--json")) {
    nlohmann::ordered_json j = {{"tokens", out},
                                {"prompt_tokens", prompt.size()},
                                {"load_seconds", t_load},
                                {"prefill_seconds", t_prefill},
                                {"prefill_tokens_per_s", prefill_tps},
                                {"decode_seconds", t_decode},
                                {"decode_tokens_per_s", decode_tps}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::string line;
  for (size_t i = 0; i < out.size(); ++i) line += (i ? "," : "") + std::to_string(out[i]);
  std::printf("%s\n", line.c_str());
  std::fprintf(stderr,
               "load %.3f s | prefill %zu tokens in %.3f s (%.1f tokens/s) | decode %lld tokens "
               "in %.3f s (%.1f tokens/s)\n",
               t_load, prompt.size(), t_prefill, prefill_tps, static_cast<long long>(decoded),
               t_decode, decode_tps);
  return 0;
}

}  // namespace kiln::cli
