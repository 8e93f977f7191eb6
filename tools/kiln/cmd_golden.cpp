#include <cstdio>

#include "engine/golden.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"
#include "tools/kiln/npy.h"

namespace kiln::cli {

namespace {

std::vector<float> prefill_logits(Engine& e, const std::vector<int32_t>& prompt,
                                  const std::string& adapter) {
  std::vector<float> logits(prompt.size() * size_t(e.config().vocab_size));
  e.prefill_logits(prompt, logits.data(), adapter);
  return logits;
}

}  // namespace

int cmd_golden(int argc, const char* const* argv) {
  if (argc < 2 || (std::string(argv[1]) != "dump" && std::string(argv[1]) != "check")) {
    if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
      std::printf(
          "usage: kiln golden dump DIR --tokens LIST --out FILE.npy [--adapter NAME]\n"
          "       kiln golden check DIR --tokens LIST --expect FILE.npy [--atol A] [--adapter "
          "NAME]\n"
          "Dumps or checks the f32 logits [tokens, vocab] of one prefill.\n");
      return 0;
    }
    throw UsageError("kiln golden: expected 'dump' or 'check' (see 'kiln golden --help')");
  }
  bool dump = std::string(argv[1]) == "dump";
  ArgParser p(dump ? "kiln golden dump" : "kiln golden check",
              dump ? "Writes the f32 logits [tokens, vocab] of one prefill to a .npy file."
                   : "Compares the logits of one prefill with a .npy file written by dump.");
  p.positional("DIR", "artifact directory");
  p.option("--tokens", "LIST", "prompt token ids, comma-separated", required);
  if (dump) {
    p.option("--out", "FILE.npy", "where to write the logits", required);
  } else {
    p.option("--expect", "FILE.npy", "logits written by 'kiln golden dump'", required);
    p.option("--atol", "A", "largest allowed |difference| of any logit", "1e-3");
  }
  p.option("--adapter", "NAME", "run-time LoRA adapter of the artifact");
  add_engine_options(p);
  Args a = p.parse(argc - 1, argv + 1);
  std::vector<int32_t> prompt = a.get_token_list("--tokens");
  auto engine = Engine::open(a.positional(0), engine_options(a));
  const std::string adapter = a.has("--adapter") ? a.get("--adapter") : "";
  if (!adapter.empty()) engine->load_adapter(adapter);
  const int64_t V = engine->config().vocab_size, T = int64_t(prompt.size());

  if (dump) {
    std::vector<float> logits = prefill_logits(*engine, prompt, adapter);
    write_npy_f32(a.get("--out"), logits.data(), {T, V});
    std::printf("wrote logits [%lld, %lld] to %s\n", static_cast<long long>(T),
                static_cast<long long>(V), a.get("--out").c_str());
    return 0;
  }

  const std::string& path = a.get("--expect");
  double atol = a.get_double("--atol", 0, 1e30);
  NpyArray expect = read_npy_f32(path);
  if (expect.shape != std::vector<int64_t>{T, V})
    throw Error(path + ": holds logits of shape " + shape_to_string(expect.shape) + ", expected [" +
                std::to_string(T) + ", " + std::to_string(V) + "] for these tokens and this model");
  std::vector<float> logits = prefill_logits(*engine, prompt, adapter);
  const LogitComparison c = compare_logits(logits, expect.data, V);
  const bool ok = c.passes(atol);
  std::printf(
      "%s: max |logit difference| %.6g at position %lld, id %lld (atol %.3g)%s\n",
      ok ? "PASS" : "FAIL", c.max_abs_diff, static_cast<long long>(c.max_diff_position),
      static_cast<long long>(c.max_diff_token_id), atol,
      c.first_top1_mismatch >= 0
          ? (", top-1 token differs at position " + std::to_string(c.first_top1_mismatch)).c_str()
          : "");
  if (!ok)
    throw Error(path + ": logits differ from the golden file (max |difference| " +
                std::to_string(c.max_abs_diff) + " > atol " + std::to_string(atol) +
                " or top-1 differs)");
  return 0;
}

}  // namespace kiln::cli
