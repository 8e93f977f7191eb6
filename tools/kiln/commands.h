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
