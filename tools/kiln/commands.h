// The `kiln` subcommands. Each parses its own arguments (tools/kiln/args.h) and returns the
// process exit code; bad input surfaces as kiln::Error (exit 1), bad usage as kiln::UsageError
// (exit 2), both turned into a one-line message by main.cpp.
#pragma once

namespace kiln::cli {

int cmd_export(int argc, const char* const* argv);
int cmd_inspect(int argc, const char* const* argv);
int cmd_run(int argc, const char* const* argv);
int cmd_golden(int argc, const char* const* argv);
int cmd_bench(int argc, const char* const* argv);
int cmd_calibrate(int argc, const char* const* argv);
int cmd_adapter(int argc, const char* const* argv);
int cmd_eval(int argc, const char* const* argv);
int cmd_tokenize(int argc, const char* const* argv);

}  // namespace kiln::cli

#include <utility>

#include "engine/engine.h"

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

// Adapters recorded in a manifest (tools/kiln/cmd_adapter.cpp; also used by inspect).
void print_adapters(const Manifest& m);

// The engine's tokenizer; if the artifact has none, throws naming `dir` and then `what` (the
// consequence and the way out).
const Tokenizer& require_tokenizer(const Engine& engine, const std::string& dir,
                                   const std::string& what);
// A text prompt as the model sees it: [bos] (if the tokenizer has one) + the text's pieces.
std::vector<int32_t> text_prompt(const Tokenizer& tok, const std::string& text);

// Seconds since an arbitrary fixed point (monotonic).
double now_seconds();

}  // namespace kiln::cli
