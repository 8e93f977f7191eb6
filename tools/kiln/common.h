// What several `kiln` commands share: the engine options, reading prompt and text files, the
// artifact's tokenizer, the adapter listing, and the engine behind `kiln export
// --qk-clip-calibrate`.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/runner.h"  // now_seconds, for the commands' timings
#include "export/qk_clip.h"
#include "schema/manifest.h"

namespace kiln::cli {

class ArgParser;
class Args;

// Options every command that runs the model shares: --threads, --no-relayout, --no-verify.
void add_engine_options(ArgParser& p);
EngineOptions engine_options(const Args& a);
// --no-verify alone, for the commands that read an artifact without running it.
void add_no_verify(ArgParser& p);

// Which lines read_lines skips.
enum class Blank {
  kEmpty,       // empty lines (text: a line of spaces is still text)
  kWhitespace,  // lines of spaces and tabs only (token-id lists)
};
// The lines of a text file that are not blank, each with its 1-based line number, without the
// line ending ('\n' or CRLF; the last line may lack one). A file that cannot be opened or read is
// a kiln::Error naming it, and so is one with no line left: "PATH: " + `if_none`.
std::vector<std::pair<int64_t, std::string>> read_lines(const std::string& path, Blank blank,
                                                        const std::string& if_none);

// Prompts for calibration: one per line, token ids comma-separated; blank lines skipped.
std::vector<std::vector<int32_t>> read_prompts_file(const std::string& path);

// Engine::calibrate_max_logits with errors prefixed by the prompts file's name.
std::vector<float> calibrate(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                             const std::string& prompts_path);

// The measurements of `kiln export --qk-clip-calibrate`: the engine on a prompts file (read when
// constructed, so that a bad file is reported before anything is exported).
class PromptsCalibrator final : public MaxLogitCalibrator {
 public:
  explicit PromptsCalibrator(const std::string& prompts_path);
  std::vector<float> max_logits(const std::string& artifact_dir) override;
  std::string source() const override { return path_; }

 private:
  std::string path_;
  std::vector<std::vector<int32_t>> prompts_;
};

// The adapters recorded in a manifest, one line each (`kiln adapter list`, `kiln inspect`).
void print_adapters(const Manifest& m);

// The engine's tokenizer; if the artifact has none, throws naming `dir` and then `what` (the
// consequence and the way out).
const Tokenizer& require_tokenizer(const Engine& engine, const std::string& dir,
                                   const std::string& what);
// A text prompt as the model sees it: [bos] (if the tokenizer has one) + the text's pieces.
std::vector<int32_t> text_prompt(const Tokenizer& tok, const std::string& text);

}  // namespace kiln::cli
