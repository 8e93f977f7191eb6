// kiln — export MaxText checkpoints to per-layer bf16 artifacts and run them on the CPU.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>

#include "common/error.h"
#include "common/interrupt.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/contention.h"

namespace {

constexpr const char* kUsage =
    "usage: kiln <command> [options]   (kiln <command> --help for its options)\n"
    "\n"
    "commands:\n"
    "  export    training checkpoint (safetensors, MaxText layout) + config -> artifact directory\n"
    "  inspect   show an artifact's manifest, tensors and provenance, checksums verified\n"
    "  run       prefill a prompt (text or token ids) and generate, with timings\n"
    "  eval      perplexity and tokens/s on a text file\n"
    "  tokenize  the artifact's tokenizer on a file: text -> ids, or ids -> text\n"
    "  golden    dump / check the logits of one prefill (regression tests)\n"
    "  bench     start-up phases, prefill and decode tokens/s, peak memory\n"
    "  calibrate record per-layer, per-head max attention logits on prompts (for QK-Clip)\n"
    "  adapter   add / remove / list the run-time LoRA adapters of an artifact\n"
    "  contend   run competing load (busy loops, memory streams, page faults, thread teams)\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace kiln::cli;
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd == "--version") {
    std::printf("kiln %s\n", KILN_VERSION);
    return 0;
  }
  const char* const* sub_argv = argv + 1;
  int sub_argc = argc - 1;
  try {
    if (cmd == "export") {
      kiln::install_interrupt_handler();  // Ctrl-C removes the half-written artifact
      return cmd_export(sub_argc, sub_argv);
    }
    if (cmd == "adapter") {
      kiln::install_interrupt_handler();
      return cmd_adapter(sub_argc, sub_argv);
    }
    if (cmd == "inspect") return cmd_inspect(sub_argc, sub_argv);
    if (cmd == "run") return cmd_run(sub_argc, sub_argv);
    if (cmd == "golden") return cmd_golden(sub_argc, sub_argv);
    if (cmd == "bench") return cmd_bench(sub_argc, sub_argv);
    if (cmd == "calibrate") return cmd_calibrate(sub_argc, sub_argv);
    if (cmd == "eval") return cmd_eval(sub_argc, sub_argv);
    if (cmd == "tokenize") return cmd_tokenize(sub_argc, sub_argv);
    if (cmd == "contend") return cmd_contend(sub_argc, sub_argv);
    std::fprintf(stderr, "kiln: error: unknown command '%s'\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const HelpRequested& h) {
    std::fputs(h.usage().c_str(), stdout);
    return 0;
  } catch (const kiln::Interrupted& e) {
    std::fprintf(stderr, "kiln: %s\n", e.what());
    return 130;  // the shell's convention for SIGINT
  } catch (const kiln::UsageError& e) {
    std::fprintf(stderr, "kiln: error: %s\n", e.what());  // names the subcommand itself
    return 2;
  } catch (const kiln::Error& e) {
    std::fprintf(stderr, "kiln: error: %s\n", e.what());
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    // The system refused an operation on a path the user gave (permissions, a name too long):
    // bad input, not a bug. The message names the path.
    std::fprintf(stderr, "kiln: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "kiln: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln: internal error: %s\n", e.what());
    return 3;
  }
}
