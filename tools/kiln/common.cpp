#include "tools/kiln/common.h"

#include <cstdio>
#include <map>
#include <string_view>

#include "common/file_io.h"
#include "tools/kiln/args.h"

namespace kiln::cli {

void add_engine_options(ArgParser& p) {
  p.option("--threads", "N", "worker threads (default: every core)", "0");
  p.flag("--fixed-threads",
         "run every decode step on --threads threads (default: fewer when measured steps show "
         "fewer are faster, e.g. cores shared with other work; the results are the same)");
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
  o.model.adapt_threads = !a.has("--fixed-threads");
  o.model.verify_checksums = !a.has("--no-verify");
  return o;
}

std::vector<std::vector<int32_t>> read_prompts_file(const std::string& path) {
  std::vector<std::vector<int32_t>> prompts;
  for (const auto& [n, line] : read_lines(path, Blank::kWhitespace,
                                          "no prompts (expected one comma-separated line each)")) {
    try {
      prompts.push_back(parse_token_list(line, path + ": line " + std::to_string(n)));
    } catch (const UsageError& e) {
      throw Error(e.what());  // bad file content is bad input (exit 1), not bad usage
    }
  }
  return prompts;
}

std::vector<float> calibrate(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                             const std::string& prompts_path) {
  try {
    return engine.calibrate_max_logits(prompts);
  } catch (const Error& e) {
    throw Error(prompts_path + ": " + e.what());  // e.g. a token outside the vocabulary
  }
}

PromptsCalibrator::PromptsCalibrator(const std::string& prompts_path)
    : path_(prompts_path), prompts_(read_prompts_file(prompts_path)) {}

std::vector<float> PromptsCalibrator::max_logits(const std::string& artifact_dir) {
  EngineOptions eo;
  eo.model.relayout = false;  // measured once per clipped layer: skip the re-layout
  return calibrate(*Engine::open(artifact_dir, eo), prompts_, path_);
}

const Tokenizer& require_tokenizer(const Engine& engine, const std::string& dir,
                                   const std::string& what) {
  if (!engine.tokenizer())
    throw Error(dir + ": the artifact has no tokenizer (exported without --tokenizer FILE), so " +
                what);
  return *engine.tokenizer();
}

std::vector<int32_t> text_prompt(const Tokenizer& tok, const std::string& text) {
  std::vector<int32_t> ids;
  if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
  const std::vector<int32_t> body = tok.encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

std::vector<std::pair<int64_t, std::string>> read_lines(const std::string& path, Blank blank,
                                                        const std::string& if_none) {
  const std::string text = read_whole_file(path);
  std::vector<std::pair<int64_t, std::string>> out;
  std::string_view rest = text;
  for (int64_t n = 1; !rest.empty(); ++n) {
    const size_t eol = rest.find('\n');
    std::string_view line = rest.substr(0, eol);
    rest.remove_prefix(eol == std::string_view::npos ? rest.size() : eol + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // CRLF files
    const bool skip = blank == Blank::kEmpty ? line.empty()
                                             : line.find_first_not_of(" \t\r") == std::string::npos;
    if (!skip) out.emplace_back(n, std::string(line));
  }
  if (out.empty()) throw Error(path + ": " + if_none);
  return out;
}

void print_adapters(const Manifest& m) {
  for (const AdapterRecord& a : m.adapters) {
    std::string tensors;
    for (const auto& [name, n] : a.targets_per_tensor())
      tensors += (tensors.empty() ? "" : ", ") + name + "×" + std::to_string(n);
    std::printf("  %-16s %-7s rank %-4lld %8.2f MiB  %s%s\n", a.name.c_str(), a.format.c_str(),
                static_cast<long long>(a.rank), double(a.bytes()) / (1 << 20), tensors.c_str(),
                a.merged ? "  (merged at export)" : "");
  }
}

}  // namespace kiln::cli
