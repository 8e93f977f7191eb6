#include <chrono>
#include <cstdio>
#include <fstream>
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

namespace {

// One line of a --prompts-file: "[@ADAPTER ]id,id,...".
struct Request {
  std::vector<int32_t> prompt;
  std::string adapter;
};

std::vector<Request> read_requests(const std::string& path) {
  std::vector<Request> out;
  std::ifstream f(path);
  if (!f) throw Error(path + ": cannot open prompts file");
  std::string line;
  for (int64_t n = 1; std::getline(f, line); ++n) {
    size_t b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos) continue;
    Request r;
    std::string rest = line.substr(b);
    if (rest[0] == '@') {
      size_t sp = rest.find_first_of(" \t");
      if (sp == std::string::npos)
        throw Error(path + ":" + std::to_string(n) + ": '@ADAPTER' must be followed by token ids");
      r.adapter = rest.substr(1, sp - 1);
      rest = rest.substr(sp + 1);
    }
    r.prompt = parse_token_list(rest, path + ":" + std::to_string(n));
    out.push_back(std::move(r));
  }
  if (out.empty()) throw Error(path + ": no prompts");
  return out;
}

// Continuous batching over the engine's slots: a request enters whenever a slot is free, and
// every step advances all active slots together.
int run_requests(Engine& engine, const std::vector<Request>& reqs, int64_t max_tokens,
                 const SamplingParams& sp, bool json, double t_load) {
  const int64_t S = engine.slots();
  std::vector<std::vector<int32_t>> out(reqs.size());
  std::vector<int64_t> slot_req(size_t(S), -1);
  std::vector<int32_t> step(static_cast<size_t>(S));
  size_t next = 0, done = 0;
  int64_t generated = 0;
  const double t0 = now_seconds();
  while (done < reqs.size()) {
    for (int64_t s = 0; s < S && next < reqs.size(); ++s) {
      if (slot_req[size_t(s)] >= 0) continue;
      const Request& r = reqs[next];
      if (int64_t(r.prompt.size()) + max_tokens - 1 > engine.max_seq_len())
        throw Error("prompt " + std::to_string(next + 1) + " (" + std::to_string(r.prompt.size()) +
                    " tokens) + --max-tokens exceeds the context of " +
                    std::to_string(engine.max_seq_len()) + " tokens");
      out[next].push_back(engine.insert(s, r.prompt, sp, r.adapter));
      ++generated;
      slot_req[size_t(s)] = int64_t(next++);
    }
    for (int64_t s = 0; s < S; ++s) {  // a request whose first token is its last
      const int64_t q = slot_req[size_t(s)];
      if (q >= 0 && int64_t(out[size_t(q)].size()) >= max_tokens) {
        engine.release(s);
        slot_req[size_t(s)] = -1;
        ++done;
      }
    }
    bool any = false;
    for (int64_t q : slot_req) any = any || q >= 0;
    if (!any) continue;
    engine.generate_slots(step);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t q = slot_req[size_t(s)];
      if (q < 0) continue;
      out[size_t(q)].push_back(step[size_t(s)]);
      ++generated;
      if (int64_t(out[size_t(q)].size()) >= max_tokens) {
        engine.release(s);
        slot_req[size_t(s)] = -1;
        ++done;
      }
    }
  }
  const double seconds = now_seconds() - t0;
  if (json) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (size_t i = 0; i < reqs.size(); ++i)
      list.push_back(
          {{"tokens", out[i]},
           {"adapter", reqs[i].adapter.empty() ? nlohmann::ordered_json(nullptr)
                                               : nlohmann::ordered_json(reqs[i].adapter)},
           {"finish_reason", "length"}});
    nlohmann::ordered_json j = {{"requests", list},
                                {"slots", S},
                                {"load_seconds", t_load},
                                {"seconds", seconds},
                                {"tokens_per_s", double(generated) / seconds}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::string line = reqs[i].adapter.empty() ? "" : "@" + reqs[i].adapter + " ";
    for (size_t k = 0; k < out[i].size(); ++k) line += (k ? "," : "") + std::to_string(out[i][k]);
    std::printf("%s\n", line.c_str());
  }
  std::fprintf(stderr, "%zu requests, %lld slots: %lld tokens in %.3f s (%.1f tokens/s)\n",
               reqs.size(), static_cast<long long>(S), static_cast<long long>(generated), seconds,
               double(generated) / seconds);
  return 0;
}

}  // namespace

int cmd_run(int argc, const char* const* argv) {
  ArgParser p("kiln run", "Prefills a prompt and generates tokens, printing them with timings.");
  p.positional("DIR", "artifact directory");
  p.option("--tokens", "LIST", "prompt token ids, comma-separated");
  p.option("--prompts-file", "FILE",
           "run every line ('[@ADAPTER ]id,id,...') with continuous batching over --slots");
  p.option("--slots", "N", "decode slots for --prompts-file", "4");
  p.option("--adapter", "NAME", "run-time LoRA adapter of the artifact (kiln adapter list)");
  p.option("--max-tokens", "N", "tokens to generate (the first comes from the prefill)", "32");
  p.option("--temperature", "T", "0 = greedy", "0");
  p.option("--top-k", "K", "keep the K most likely tokens (0 = off)", "0");
  p.option("--top-p", "P", "keep the smallest set with probability >= P (1 = off)", "1");
  p.option("--seed", "S", "sampling seed", "0");
  add_engine_options(p);
  p.flag("--json", "print one JSON object with the tokens and timings");
  Args a = p.parse(argc, argv);

  if (a.has("--tokens") == a.has("--prompts-file"))
    throw a.error("give either --tokens or --prompts-file");
  int64_t max_tokens = a.get_int("--max-tokens", 1, 1 << 24);
  SamplingParams sp;
  sp.temperature = float(a.get_double("--temperature", 0, 1e6));
  sp.top_k = int32_t(a.get_int("--top-k", 0, 1 << 30));
  sp.top_p = float(a.get_double("--top-p", 0, 1));
  sp.seed = a.get_u64("--seed");
  if (sp.top_p <= 0) throw a.error("--top-p must be in (0, 1]");

  EngineOptions eo = engine_options(a);
  std::vector<Request> reqs;
  if (a.has("--prompts-file")) {
    reqs = read_requests(a.get("--prompts-file"));
    eo.slots = a.get_int("--slots", 1, 512);
  } else if (a.given("--slots")) {
    throw a.error("--slots applies to --prompts-file");
  }
  double t0 = now_seconds();
  auto engine = Engine::open(a.positional(0), eo);
  std::string adapter = a.has("--adapter") ? a.get("--adapter") : "";
  if (!adapter.empty()) engine->load_adapter(adapter);
  for (const Request& r : reqs)
    if (!r.adapter.empty()) engine->load_adapter(r.adapter);
  double t_load = now_seconds() - t0;
  if (!reqs.empty()) return run_requests(*engine, reqs, max_tokens, sp, a.has("--json"), t_load);

  std::vector<int32_t> prompt = a.get_token_list("--tokens");
  if (int64_t(prompt.size()) + max_tokens - 1 > engine->max_seq_len())
    throw Error("prompt (" + std::to_string(prompt.size()) + " tokens) + --max-tokens " +
                std::to_string(max_tokens) + " exceeds the context of " +
                std::to_string(engine->max_seq_len()) + " tokens");

  std::vector<int32_t> out;
  out.reserve(size_t(max_tokens));
  double t1 = now_seconds();
  out.push_back(engine->prefill(prompt, sp, adapter));
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
