// Text commands: `kiln eval` (perplexity on a text file) and `kiln tokenize` (the artifact's
// tokenizer on a file, both ways).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string_view>

#include "common/file_io.h"
#include "engine/runner.h"
#include "export/adapter.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

namespace {

// What eval and tokenize say about a file without a non-empty line.
constexpr const char* kNoLines = "no non-empty lines";

}  // namespace

int cmd_eval(int argc, const char* const* argv) {
  ArgParser p("kiln eval",
              "Perplexity of the model on a text file: every non-empty line is one sequence, "
              "[bos] + tokens + [eos], scored on each next token from position 0; ppl = exp(total "
              "negative log-likelihood / predicted tokens).");
  p.positional("DIR", "artifact directory (exported with --tokenizer)");
  p.option("--text-file", "FILE", "text, one sequence per line", required);
  p.option("--adapter", "NAME", "run-time LoRA adapter of the artifact (kiln adapter list)");
  add_engine_options(p);
  p.flag("--json", "print one JSON object");
  Args a = p.parse(argc, argv);

  const std::string dir = a.positional(0), path = a.get("--text-file");
  const double t0 = now_seconds();
  auto engine = Engine::open(dir, engine_options(a));
  const std::string adapter = a.has("--adapter") ? a.get("--adapter") : "";
  if (!adapter.empty()) engine->load_adapter(adapter);
  const double t_load = now_seconds() - t0;
  const Tokenizer& tok = require_tokenizer(*engine, dir, "eval cannot read text");
  const auto lines = read_lines(path, Blank::kEmpty, kNoLines);

  const bool progress = !a.has("--json") && ::isatty(STDERR_FILENO) == 1;
  Scorer scorer(*engine, adapter);
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& [n, text] = lines[i];
    std::vector<int32_t> ids = text_prompt(tok, text);
    if (tok.eos_id() >= 0) ids.push_back(tok.eos_id());
    if (ids.size() < 2) continue;  // nothing to predict
    if (int64_t(ids.size()) > engine->max_seq_len())
      throw Error(path + ":" + std::to_string(n) + ": " + std::to_string(ids.size()) +
                  " tokens exceed the model's context of " + std::to_string(engine->max_seq_len()));
    try {
      scorer.add(ids);
    } catch (const NonFiniteError& e) {
      throw Error(path + ":" + std::to_string(n) + ": " + e.what());
    }
    if (progress && (i + 1) % 50 == 0)
      std::fprintf(stderr, "\reval: %zu/%zu lines", i + 1, lines.size());
  }
  if (progress && lines.size() >= 50) std::fputc('\n', stderr);
  if (scorer.predicted() == 0) throw Error(path + ": no line has a token to predict");
  const double nll = scorer.nll(), ppl = scorer.perplexity(), seconds = scorer.seconds();
  const int64_t predicted = scorer.predicted(), processed = scorer.processed();
  const double tps = seconds > 0 ? double(processed) / seconds : 0;
  if (a.has("--json")) {
    nlohmann::ordered_json j = {{"text_file", path},
                                {"adapter", adapter.empty() ? nlohmann::ordered_json(nullptr)
                                                            : nlohmann::ordered_json(adapter)},
                                {"lines", lines.size()},
                                {"predicted_tokens", predicted},
                                {"nll", nll},
                                {"perplexity", ppl},
                                {"tokens", processed},
                                {"seconds", seconds},
                                {"tokens_per_s", tps},
                                {"load_seconds", t_load}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("perplexity %.4f over %lld predicted tokens in %zu lines%s\n", ppl,
              static_cast<long long>(predicted), lines.size(),
              adapter.empty() ? "" : (" (adapter " + adapter + ")").c_str());
  std::printf(
      "speed      %lld tokens in %.2f s (%.1f tokens/s, prefill of each line); load %.2f s\n",
      static_cast<long long>(processed), seconds, tps, t_load);
  return 0;
}

int cmd_tokenize(int argc, const char* const* argv) {
  ArgParser p("kiln tokenize",
              "The artifact's tokenizer on a file: each non-empty line of text becomes a line of "
              "comma-separated token ids (no bos/eos), or with --decode each line of ids becomes "
              "text.");
  p.positional("DIR", "artifact directory (exported with --tokenizer)");
  p.option("--text-file", "FILE", "text to encode, one sequence per line");
  p.option("--tokens-file", "FILE", "with --decode: token ids to decode, one sequence per line");
  p.flag("--decode", "decode --tokens-file instead of encoding --text-file");
  add_no_verify(p);
  Args a = p.parse(argc, argv);

  const std::string dir = a.positional(0);
  const Manifest m = read_manifest_in(dir, !a.has("--no-verify"));
  if (m.tokenizer.empty())
    throw Error(dir + ": the artifact has no tokenizer (exported without --tokenizer)");
  const Tokenizer tok(m.tokenizer, dir + ": manifest tokenizer");
  if (a.has("--decode")) {
    if (!a.has("--tokens-file") || a.has("--text-file"))
      throw a.error("--decode takes --tokens-file (and no --text-file)");
    const std::string path = a.get("--tokens-file");
    for (const auto& [n, line] : read_lines(path, Blank::kEmpty, kNoLines)) {
      const std::vector<int32_t> ids = parse_token_list(line, path + ":" + std::to_string(n));
      for (int32_t id : ids)
        if (id < 0 || id >= tok.vocab_size())
          throw Error(path + ":" + std::to_string(n) + ": token " + std::to_string(id) +
                      " is outside the tokenizer's " + std::to_string(tok.vocab_size()) +
                      " pieces");
      std::printf("%s\n", tok.decode(ids).c_str());
    }
    return 0;
  }
  if (!a.has("--text-file") || a.has("--tokens-file"))
    throw a.error("give --text-file (or --decode --tokens-file)");
  for (const auto& [n, line] : read_lines(a.get("--text-file"), Blank::kEmpty, kNoLines)) {
    const std::vector<int32_t> ids = tok.encode(line);
    std::string out;
    for (size_t k = 0; k < ids.size(); ++k) out += (k ? "," : "") + std::to_string(ids[k]);
    std::printf("%s\n", out.c_str());
  }
  return 0;
}

}  // namespace kiln::cli
