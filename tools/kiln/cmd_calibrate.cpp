#include <algorithm>
#include <cmath>
#include <cstdio>

#include "export/safetensors.h"
#include "tools/kiln/args.h"
#include "tools/kiln/commands.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

int cmd_calibrate(int argc, const char* const* argv) {
  ArgParser p("kiln calibrate",
              "Runs prompts through an artifact and records, per layer and attention head, the "
              "largest pre-softmax logit (after the softmax scale, unmasked positions) — the "
              "statistics `kiln export --max-logits` reads for QK-Clip.");
  p.positional("DIR", "artifact directory");
  p.option("--tokens-file", "FILE", "prompts, one per line, token ids comma-separated", required);
  p.option("--out", "STATS.safetensors", "where to write the statistics", required);
  add_engine_options(p);
  Args a = p.parse(argc, argv);

  std::vector<std::vector<int32_t>> prompts = read_prompts_file(a.get("--tokens-file"));

  auto engine = Engine::open(a.positional(0), engine_options(a));
  const ModelConfig& c = engine->config();
  double t0 = now_seconds();
  std::vector<float> max = calibrate(*engine, prompts, a.get("--tokens-file"));
  double secs = now_seconds() - t0;

  // One key per unrolled layer, MaxText's intermediate form [batch = 1, heads].
  std::vector<F32Tensor> out;
  float overall = -INFINITY;
  for (int64_t l = 0; l < c.num_decoder_layers; ++l) {
    F32Tensor t{"decoder.layers_" + std::to_string(l) + ".self_attention.attention_op.max_logits",
                {1, c.num_query_heads},
                {max.begin() + l * c.num_query_heads, max.begin() + (l + 1) * c.num_query_heads}};
    for (float v : t.data) overall = std::max(overall, v);
    out.push_back(std::move(t));
  }
  write_safetensors_f32(a.get("--out"), out);
  std::printf(
      "calibrated %zu prompts in %.2f s: largest max logit %.4g; wrote %lld layers x %lld "
      "heads to %s\n",
      prompts.size(), secs, double(overall), static_cast<long long>(c.num_decoder_layers),
      static_cast<long long>(c.num_query_heads), a.get("--out").c_str());
  return 0;
}

}  // namespace kiln::cli
