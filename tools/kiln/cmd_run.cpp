#include <chrono>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"

namespace kiln::cli {

void add_engine_options(ArgParser& p) {
  p.option("--threads", "N", "worker threads (default: every core)", "0");
  p.flag("--no-relayout", "use the mapped weights in place instead of re-laying them for speed");
  add_no_verify(p);
}

void add_no_verify(ArgParser& p) {
  p.flag("--no-verify",
         "skip the checksums of the manifest and every tensor, checked by default (damaged "
         "weights then go unnoticed)");
}

EngineOptions engine_options(const Args& a) {
  EngineOptions o;
  o.model.threads = int(a.get_int("--threads", 0, kMaxThreads));
  o.model.relayout = !a.has("--no-relayout");
  o.model.verify_checksums = !a.has("--no-verify");
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
  for (const auto& [n, line] : read_lines(path, Blank::kWhitespace, "no prompts")) {
    Request r;
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

// What one request (or one sample) produced.
struct Output {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  FinishReason finish = FinishReason::None;
};

struct Timing {
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prompt_tokens = 0, generated = 0, decoded = 0;  // decoded: tokens from generate()
};

// Continuous batching over the engine's slots: whenever slots are free the next requests are
// prefilled (one by one, or packed into one prefill_concat pass) and inserted, and every step
// advances all active slots together. With `samples` > 1 each request is prefilled once
// (prefill_multisampling) and its samples enter that many free slots together (bulk_insert);
// `packed` then does not apply. Returns the outputs in request order, a request's samples in
// sample order. `on_token` (optional) sees every token as it is produced.
std::vector<Output> run_requests(Engine& engine, const std::vector<Request>& reqs,
                                 const SamplingParams& sp, int64_t samples, bool packed, Timing& t,
                                 const std::function<void(const SlotToken&)>& on_token = {}) {
  const int64_t S = engine.slots();
  if (samples < 1 || samples > S)
    throw std::logic_error("run_requests: " + std::to_string(samples) + " samples for " +
                           std::to_string(S) + " slots");
  const size_t k = size_t(samples);
  std::vector<Output> out(reqs.size() * k);
  std::vector<int64_t> slot_out(size_t(S), -1);  // the output each slot produces, or -1 if free
  size_t next = 0, done = 0;
  auto record = [&](const SlotToken& st) {
    Output& o = out[size_t(slot_out[size_t(st.slot)])];
    if (on_token) on_token(st);
    o.tokens.push_back(st.token);
    o.logprobs.push_back(st.logp);
    ++t.generated;
    if (st.finish != FinishReason::None) {
      o.finish = st.finish;
      engine.release(st.slot);
      slot_out[size_t(st.slot)] = -1;
      ++done;
    }
  };
  // A NaN logit is reported at its position; with several requests, in the request's words.
  auto name_request = [&](size_t index, const std::string& slot, const NonFiniteError& e) {
    if (reqs.size() == 1) return e;
    return NonFiniteError("request " + std::to_string(index + 1) + slot, int64_t(index),
                          e.position());
  };
  while (done < out.size()) {
    std::vector<int64_t> free_slots;
    for (int64_t s = 0; s < S; ++s)
      if (slot_out[size_t(s)] < 0) free_slots.push_back(s);
    const size_t n = std::min(free_slots.size() / k, reqs.size() - next);
    if (n > 0) {
      const double t0 = now_seconds();
      std::vector<Prefix> prefixes;
      size_t i = 0;
      try {
        if (samples > 1) {
          for (; i < n; ++i)
            prefixes.push_back(engine.prefill_multisampling(reqs[next + i].prompt, samples, sp,
                                                            reqs[next + i].adapter));
        } else if (packed) {
          std::vector<PrefillRequest> batch;
          for (size_t j = 0; j < n; ++j)
            batch.push_back({reqs[next + j].prompt, sp, reqs[next + j].adapter});
          prefixes = engine.prefill_concat(batch);
        } else {
          for (; i < n; ++i)
            prefixes.push_back(engine.prefill(reqs[next + i].prompt, sp, reqs[next + i].adapter));
        }
      } catch (const NonFiniteError& e) {
        throw name_request(next + (packed && samples == 1 ? size_t(e.sequence()) : i), "", e);
      }
      t.prefill_seconds += now_seconds() - t0;
      for (i = 0; i < n; ++i, ++next) {
        t.prompt_tokens += int64_t(reqs[next].prompt.size());
        const std::span<const int64_t> slots(free_slots.data() + i * k, k);
        for (size_t j = 0; j < k; ++j) slot_out[size_t(slots[j])] = int64_t(next * k + j);
        if (samples > 1) {
          for (const SlotToken& st : engine.bulk_insert(std::move(prefixes[i]), slots)) record(st);
        } else {
          record(engine.insert(std::move(prefixes[i]), slots[0]));
        }
      }
    }
    if (done == out.size()) break;  // every request ended with its prefill's token
    const double t1 = now_seconds();
    std::span<const SlotToken> step;
    try {
      step = engine.generate();
    } catch (const NonFiniteError& e) {
      throw name_request(size_t(slot_out[size_t(e.sequence())]) / k,
                         " (slot " + std::to_string(e.sequence()) + ")", e);
    }
    t.decode_seconds += now_seconds() - t1;
    t.decoded += int64_t(step.size());
    for (const SlotToken& st : step) record(st);
  }
  return out;
}

nlohmann::ordered_json output_json(const Output& o) {
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
  if (a.has("--sampling")) {
    sp.algorithm = parse_sampling_algorithm(a.get("--sampling"));
    sp.temperature =
        a.given("--temperature") ? float(a.get_double("--temperature", -1e6, 1e6)) : 1.0f;
  } else {
    sp.temperature =
        a.given("--temperature") ? float(a.get_double("--temperature", -1e6, 1e6)) : 0.0f;
    sp.algorithm = infer_sampling_algorithm(sp.temperature, sp.top_k, sp.top_p);
  }
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
  std::vector<Request> reqs;
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
  for (const Request& r : reqs)
    if (!r.adapter.empty()) engine->load_adapter(r.adapter);
  const double t_load = now_seconds() - t0;
  const bool json = a.has("--json");

  Timing t;
  const double t1 = now_seconds();
  std::vector<Output> out;
  if (text && !json && samples == 1) {  // stream the continuation as it arrives
    TextStream stream(*tok);
    out = run_requests(*engine, reqs, sp, 1, false, t, [&](const SlotToken& st) {
      std::fputs(stream.push(st.token).c_str(), stdout);
      std::fflush(stdout);
    });
    std::printf("%s\n", stream.finish().c_str());
    std::fflush(stdout);  // before the timings on stderr
  } else {
    out = run_requests(*engine, reqs, sp, samples, a.has("--packed-prefill"), t);
  }
  const double seconds = now_seconds() - t1;
  const double prefill_tps =
      t.prefill_seconds > 0 ? double(t.prompt_tokens) / t.prefill_seconds : 0;
  const double decode_tps = t.decode_seconds > 0 ? double(t.decoded) / t.decode_seconds : 0;

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
      for (const Output& o : out) {
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
