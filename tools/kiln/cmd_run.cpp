#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

#include "engine/runner.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

namespace {

// The lines of a --prompts-file: "[@ADAPTER ]id,id,...".
std::vector<GenerationRequest> read_requests(const std::string& path) {
  std::vector<GenerationRequest> out;
  for (const auto& [n, line] : read_lines(path, Blank::kWhitespace, "no prompts")) {
    GenerationRequest r;
    std::string rest = line.substr(line.find_first_not_of(" \t\r"));
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
  return out;
}

nlohmann::ordered_json output_json(const GenerationOutput& o) {
  return {{"tokens", o.tokens},
          {"logprobs", o.logprobs},
          {"finish_reason", finish_reason_name(o.finish)}};
}

std::string token_line(const std::vector<int32_t>& tokens) {
  std::string line;
  for (size_t k = 0; k < tokens.size(); ++k) line += (k ? "," : "") + std::to_string(tokens[k]);
  return line;
}

SamplingParams sampling_params(const Args& a) {
  SamplingParams sp;
  sp.top_k = int32_t(a.get_int("--top-k", -(1 << 30), 1 << 30));  // the sampler checks it
  sp.top_p = float(a.get_double("--top-p", -1e6, 1e6));
  sp.seed = a.get_u64("--seed");
  sp.max_new_tokens = a.get_int("--max-tokens", 1, 1 << 24);
  if (a.has("--stop")) sp.stop_tokens = a.get_token_list("--stop");
  resolve_sampling_algorithm(
      sp, a.has("--sampling") ? std::optional<std::string>(a.get("--sampling")) : std::nullopt,
      a.given("--temperature") ? std::optional<float>(a.get_double("--temperature", -1e6, 1e6))
                               : std::nullopt);
  return sp;
}

}  // namespace

int cmd_run(int argc, const char* const* argv) {
  ArgParser p("kiln run",
              "Prefills prompts and generates tokens (continuous batching over decode slots), "
              "printing them with timings.");
  p.positional("DIR", "artifact directory");
  p.option("--prompt", "TEXT",
           "prompt text, tokenized with the artifact's tokenizer ([bos] first); the "
           "continuation is printed as text while it is generated and ends at eos by default");
  p.option("--tokens", "LIST", "prompt token ids, comma-separated");
  p.option("--prompts-file", "FILE",
           "run every line ('[@ADAPTER ]id,id,...') with continuous batching over --slots");
  p.option("--slots", "N", "decode slots for --prompts-file", "4");
  p.flag("--packed-prefill",
         "with --prompts-file: prefill the prompts that enter free slots together in one packed "
         "pass (prefill_concat)");
  p.option("--samples", "N", "with --tokens or --prompt: N independent samples of one prefill",
           "1");
  p.option("--adapter", "NAME", "run-time LoRA adapter of the artifact (kiln adapter list)");
  p.option("--max-tokens", "N", "tokens per request, the prefill's first one included", "32");
  p.option("--stop", "LIST",
           "stop token ids: a request ends after producing one (with --prompt: default eos)");
  p.option("--sampling", "ALGO",
           "greedy, weighted, topk, nucleus or composite (MaxText's semantics; default: greedy, "
           "or what --temperature/--top-k/--top-p imply)");
  p.option("--temperature", "T", "sampling temperature (without --sampling: 0 = greedy)");
  p.option("--top-k", "K", "topk/composite: keep the K largest logits", "0");
  p.option("--top-p", "P", "nucleus/composite: keep the smallest set with probability >= P", "1");
  p.option("--seed", "S", "sampling seed (each request's stream starts from it)", "0");
  add_engine_options(p);
  p.flag("--json", "print one JSON object with the tokens, log-probabilities and timings");
  Args a = p.parse(argc, argv);

  if (int(a.has("--tokens")) + int(a.has("--prompts-file")) + int(a.has("--prompt")) != 1)
    throw a.error("give one of --prompt, --tokens or --prompts-file");
  const bool text = a.has("--prompt");
  SamplingParams sp = sampling_params(a);
  EngineOptions eo = engine_options(a);
  // Each sample and each request in flight takes a decode slot; the engine has at most max_chunk.
  const int64_t samples = a.get_int("--samples", 1, eo.model.max_chunk);
  std::vector<GenerationRequest> reqs;
  if (a.has("--prompts-file")) {
    reqs = read_requests(a.get("--prompts-file"));
    if (a.has("--adapter")) throw a.error("with --prompts-file, name adapters per line (@NAME)");
    if (a.given("--samples")) throw a.error("--samples applies to --tokens");
    eo.slots = a.get_int("--slots", 1, eo.model.max_chunk);
  } else {
    if (a.given("--slots")) throw a.error("--slots applies to --prompts-file");
    if (a.has("--packed-prefill")) throw a.error("--packed-prefill applies to --prompts-file");
    const std::string adapter = a.has("--adapter") ? a.get("--adapter") : "";
    reqs.push_back({text ? std::vector<int32_t>{} : a.get_token_list("--tokens"), adapter});
    eo.slots = samples;
  }
  const double t0 = now_seconds();
  auto engine = Engine::open(a.positional(0), eo);
  const Tokenizer* tok = nullptr;
  if (text) {
    tok = &require_tokenizer(*engine, a.positional(0),
                             "--prompt cannot take text; give --tokens ids instead");
    reqs[0].prompt = text_prompt(*tok, a.get("--prompt"));
    if (!a.has("--stop") && tok->eos_id() >= 0) sp.stop_tokens = {tok->eos_id()};
  }
  for (const GenerationRequest& r : reqs)
    if (!r.adapter.empty()) engine->load_adapter(r.adapter);
  const double t_load = now_seconds() - t0;
  const bool json = a.has("--json");

  Runner runner(*engine);
  RunOptions ro;
  ro.samples = samples;
  ro.packed_prefill = a.has("--packed-prefill");
  const bool stream_text = text && !json && samples == 1;
  std::optional<TextStream> stream;
  if (stream_text) {  // print the continuation as it arrives
    stream.emplace(*tok);
    ro.on_token = [&](const SlotToken& st) {
      std::fputs(stream->push(st.token).c_str(), stdout);
      std::fflush(stdout);
    };
  }
  const double t1 = now_seconds();
  const std::vector<GenerationOutput> out = runner.run(reqs, sp, ro);
  if (stream_text) {
    std::printf("%s\n", stream->finish().c_str());
    std::fflush(stdout);  // before the timings on stderr
  }
  const double seconds = now_seconds() - t1;
  const RunnerStats& t = runner.stats();
  const double prefill_tps = t.prefill_tokens_per_s();
  const double decode_tps = t.decode_tokens_per_s();

  if (json) {
    nlohmann::ordered_json j;
    if (a.has("--prompts-file")) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (size_t i = 0; i < reqs.size(); ++i) {
        nlohmann::ordered_json r = output_json(out[i]);
        r["adapter"] = reqs[i].adapter.empty() ? nlohmann::ordered_json(nullptr)
                                               : nlohmann::ordered_json(reqs[i].adapter);
        list.push_back(r);
      }
      j["requests"] = list;
      j["slots"] = engine->slots();
      j["packed_prefill"] = a.has("--packed-prefill");
    } else if (samples > 1) {
      nlohmann::ordered_json list = nlohmann::ordered_json::array();
      for (const GenerationOutput& o : out) {
        list.push_back(output_json(o));
        if (tok) list.back()["text"] = tok->decode(o.tokens);
      }
      j["samples"] = list;
    } else {
      j = output_json(out[0]);
      if (tok) j["text"] = tok->decode(out[0].tokens);
    }
    if (tok) {
      j["prompt"] = a.get("--prompt");
      j["prompt_ids"] = reqs[0].prompt;
    }
    j["sampling"] = sampling_algorithm_name(sp.algorithm);
    j["prompt_tokens"] = t.prompt_tokens;
    j["generated_tokens"] = t.generated;
    j["load_seconds"] = t_load;
    j["seconds"] = seconds;
    j["tokens_per_s"] = double(t.generated) / seconds;
    j["prefill_seconds"] = t.prefill_seconds;
    j["prefill_tokens_per_s"] = prefill_tps;
    j["decode_seconds"] = t.decode_seconds;
    j["decode_tokens_per_s"] = decode_tps;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  for (size_t i = 0; i < out.size() && !(text && samples == 1); ++i) {
    if (tok) {  // samples of a text prompt
      std::printf("%s\n", tok->decode(out[i].tokens).c_str());
      continue;
    }
    const std::string tag = i < reqs.size() && !reqs[i].adapter.empty() && a.has("--prompts-file")
                                ? "@" + reqs[i].adapter + " "
                                : "";
    std::printf("%s%s\n", tag.c_str(), token_line(out[i].tokens).c_str());
  }
  std::fprintf(stderr,
               "load %.3f s | prefill %lld tokens in %.3f s (%.1f tokens/s) | decode %lld tokens "
               "in %.3f s (%.1f tokens/s) | %lld tokens in %.3f s over %lld slot(s) (%.1f "
               "tokens/s)\n",
               t_load, static_cast<long long>(t.prompt_tokens), t.prefill_seconds, prefill_tps,
               static_cast<long long>(t.decoded), t.decode_seconds, decode_tps,
               static_cast<long long>(t.generated), seconds,
               static_cast<long long>(engine->slots()), double(t.generated) / seconds);
  return 0;
}

}  // namespace kiln::cli
