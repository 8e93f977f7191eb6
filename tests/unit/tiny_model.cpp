#include "tests/unit/tiny_model.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "export/exporter.h"
#include "export/safetensors.h"

namespace fs = std::filesystem;

namespace kiln::test {

std::vector<F32Tensor> seeded_tensors(const std::vector<SeededTensorSpec>& specs, uint64_t seed,
                                      float norm_jitter) {
  std::vector<F32Tensor> tensors;
  for (const auto& t : specs) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    F32Tensor out{t.key, t.shape, {}};
    for (int64_t i = 0; i < n; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      const float u = float((seed >> 40) & 0xffffff) / float(1 << 24) * 2.0f - 1.0f;  // [-1, 1)
      out.data.push_back(t.scale == 0 ? 1.0f + norm_jitter * u : u * t.scale * 1.7f);
    }
    tensors.push_back(std::move(out));
  }
  return tensors;
}

TinyModel make_tiny_model(const std::string& name, bool tied, int64_t V) {
  const int64_t E = 64, H = 4, K = 2, D = 16, F = 128, L = 2;
  TinyModel m{fs::temp_directory_path() / ("kiln_engine_test_" + name), {}};
  fs::remove_all(m.dir);
  fs::create_directories(m.dir);
  m.artifact = m.dir / "model.kiln";

  const std::string p = "params.params.", l = p + "decoder.layers.";
  std::vector<SeededTensorSpec> ts = {
      {p + "token_embedder.embedding", {V, E}, 1.0f},
      {p + "decoder.decoder_norm.scale", {E}, 0},
      {l + "pre_self_attention_layer_norm.scale", {E, L}, 0},
      {l + "self_attention.query.kernel", {E, L, H, D}, 0.5f / 8 / 4},
      {l + "self_attention.key.kernel", {E, L, K, D}, 0.5f / 8},
      {l + "self_attention.value.kernel", {E, L, K, D}, 1.0f / 8},
      {l + "self_attention.out.kernel", {H, L, D, E}, 1.0f / 8},
      {l + "post_self_attention_layer_norm.scale", {E, L}, 0},
      {l + "mlp.wi_0.kernel", {E, L, F}, 1.0f / 8},
      {l + "mlp.wi_1.kernel", {E, L, F}, 1.0f / 8},
      {l + "mlp.wo.kernel", {F, L, E}, 1.0f / 11},
  };
  if (!tied) ts.push_back({p + "decoder.logits_dense.kernel", {E, V}, 1.0f / 8});
  write_safetensors_f32((m.dir / "model.safetensors").string(), seeded_tensors(ts, 12345, 0.0f));

  nlohmann::json cfg = {{"decoder_block", "llama2"},   {"emb_dim", E},    {"num_query_heads", H},
                        {"num_kv_heads", K},           {"head_dim", D},   {"mlp_dim", F},
                        {"num_decoder_layers", L},     {"vocab_size", V}, {"max_target_length", 96},
                        {"logits_via_embedding", tied}};
  std::ofstream(m.dir / "config.json") << cfg.dump();

  export_fixture(m.dir, m.artifact);
  return m;
}

void export_fixture(const fs::path& dir, const fs::path& artifact) {
  ExportOptions opt;
  opt.checkpoints = {(dir / "model.safetensors").string()};
  opt.config_path = (dir / "config.json").string();
  opt.out_dir = artifact.string();
  export_artifact(opt);
}

const TinyModel& tiny_untied() {
  static TinyModel m = make_tiny_model("untied", false);
  return m;
}

}  // namespace kiln::test
