// QK-Clip at export (docs/maxtext.md §3): the cases of MaxText's qk_clip_test.py, reproduced
// through the real exporter on real files, plus kiln's own options (per layer vs per group, query
// mode).
#include <doctest/doctest.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "common/bf16.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "common/mapped_file.h"
#include "export/exporter.h"
#include "export/safetensors.h"
#include "schema/blob_file.h"
#include "schema/format.h"
#include "schema/manifest.h"

namespace fs = std::filesystem;
using namespace kiln;

namespace {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
using TensorMap = std::map<std::string, Tensor>;

void write_safetensors(const fs::path& path, const TensorMap& tensors) {
  std::vector<F32Tensor> out;
  for (const auto& [k, t] : tensors) out.push_back({k, t.shape, t.data});
  write_safetensors_f32(path.string(), out);
}

Tensor filled(std::vector<int64_t> shape, uint32_t seed) {
  Tensor t{shape, {}};
  int64_t n = 1;
  for (auto d : shape) n *= d;
  for (int64_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    t.data.push_back(float(int32_t(seed >> 8) % 2000 - 1000) / 997.0f);
  }
  return t;
}

// docs/maxtext.md's test model: heads H, kernels [rank 4, H, 6] with qk_nope_head_dim 4 (so rope 2
// and v 2), unrolled Linen keys, `layers` dense layers.
struct Fixture {
  fs::path dir;
  TensorMap params;
  int64_t H, L;
};

Fixture make_deepseek(const std::string& name, int64_t H, int64_t L) {
  Fixture fx{fs::temp_directory_path() / ("kiln_qk_clip_" + name), {}, H, L};
  fs::remove_all(fx.dir);
  fs::create_directories(fx.dir);
  const int64_t E = 8, R = 4, F = 8, V = 16;
  const std::string p = "params.params.";
  fx.params[p + "token_embedder.embedding"] = filled({V, E}, 1);
  fx.params[p + "decoder.decoder_norm.scale"] = filled({E}, 2);
  fx.params[p + "decoder.logits_dense.kernel"] = filled({E, V}, 3);
  for (int64_t l = 0; l < L; ++l) {
    const std::string k = p + "decoder.dense_layers_" + std::to_string(l) + ".";
    uint32_t s = uint32_t(100 * (l + 1));
    fx.params[k + "pre_self_attention_layer_norm.scale"] = filled({E}, s + 1);
    fx.params[k + "post_self_attention_layer_norm.scale"] = filled({E}, s + 2);
    fx.params[k + "self_attention.wq_a.kernel"] = filled({E, R}, s + 3);
    fx.params[k + "self_attention.q_norm.scale"] = filled({R}, s + 4);
    fx.params[k + "self_attention.wq_b.kernel"] = filled({R, H, 6}, s + 5);
    fx.params[k + "self_attention.wkv_a.kernel"] = filled({E, R + 2}, s + 6);
    fx.params[k + "self_attention.kv_norm.scale"] = filled({R}, s + 7);
    fx.params[k + "self_attention.wkv_b.kernel"] = filled({R, H, 6}, s + 8);
    fx.params[k + "self_attention.out.kernel"] = filled({H, 2, E}, s + 9);
    fx.params[k + "mlp.wi_0.kernel"] = filled({E, F}, s + 10);
    fx.params[k + "mlp.wi_1.kernel"] = filled({E, F}, s + 11);
    fx.params[k + "mlp.wo.kernel"] = filled({F, E}, s + 12);
  }
  write_safetensors(fx.dir / "model.safetensors", fx.params);
  nlohmann::json cfg = {{"decoder_block", "deepseek"},
                        {"model_name", "deepseek3-test"},
                        {"emb_dim", E},
                        {"num_query_heads", H},
                        {"num_kv_heads", H},
                        {"mlp_dim", F},
                        {"num_decoder_layers", L},
                        {"first_num_dense_layers", L},
                        {"vocab_size", V},
                        {"q_lora_rank", R},
                        {"kv_lora_rank", R},
                        {"qk_nope_head_dim", 4},
                        {"qk_rope_head_dim", 2},
                        {"v_head_dim", 2},
                        {"rope_type", "yarn"},
                        {"scan_layers", false}};
  std::ofstream(fx.dir / "config.json") << cfg.dump();
  return fx;
}

fs::path write_stats(const Fixture& fx, const std::string& name, const TensorMap& stats) {
  fs::path p = fx.dir / name;
  write_safetensors(p, stats);
  return p;
}

ExportOptions options(const Fixture& fx, const std::string& out) {
  ExportOptions o;
  o.checkpoints = {(fx.dir / "model.safetensors").string()};
  o.config_path = (fx.dir / "config.json").string();
  o.out_dir = (fx.dir / out).string();
  o.force = true;
  o.weights_layout = TensorLayout::RowMajor;  // the checks read the weights in MaxText's order
  return o;
}

// A layer tensor of an exported artifact, as f32.
std::vector<float> artifact_tensor(const std::string& dir, int64_t layer, const std::string& name) {
  char file[32];
  std::snprintf(file, sizeof file, "layer-%03lld.kblob", static_cast<long long>(layer));
  MappedFile f((fs::path(dir) / file).string());
  BlobView v(f.data(), f.size(), f.path());
  const BlobTensorInfo* t = v.find(name);
  REQUIRE(t);
  auto bytes = v.bytes(*t);
  std::vector<float> out(bytes.size() / 2);
  convert_bf16_to_f32(reinterpret_cast<const uint16_t*>(bytes.data()), out.data(), out.size());
  return out;
}

Manifest artifact_manifest(const std::string& dir) {
  MappedFile f((fs::path(dir) / kManifestFile).string());
  return parse_manifest(f.data(), f.size(), f.path(), true);
}

float gamma_of(float tau, float s) {
  return std::min(1.0f, tau / (s + 1e-6f));
}

// Element [r, h, j] of a [rank, H, 6] kernel.
float at(const std::vector<float>& w, int64_t H, int64_t r, int64_t h, int64_t j) {
  return w[size_t((r * H + h) * 6 + j)];
}

const std::string kStatsKey =
    "intermediates.decoder.dense_layers_0.self_attention.attention_op.max_logits";

}  // namespace

TEST_CASE("QK-Clip: per-head scaling of wq_b and wkv_b (test_apply_qk_clip_logic)") {
  Fixture fx = make_deepseek("logic", 2, 1);
  ExportOptions o = options(fx, "clipped.kiln");
  o.qk_clip = {10.0,
               {write_stats(fx, "stats.safetensors", {{kStatsKey, {{1, 2}, {20, 5}}}}).string()}};
  export_artifact(o);
  const std::string l0 = "params.params.decoder.dense_layers_0.self_attention.";
  const auto& q0 = fx.params.at(l0 + "wq_b.kernel").data;
  const auto& kv0 = fx.params.at(l0 + "wkv_b.kernel").data;
  auto q = artifact_tensor(o.out_dir, 0, "attn.wq_b");
  auto kv = artifact_tensor(o.out_dir, 0, "attn.wkv_b");
  const float g = gamma_of(10, 20), sg = std::sqrt(g);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t j = 0; j < 6; ++j) {
      CAPTURE(r);
      CAPTURE(j);
      float qs = j < 4 ? sg : g;
      CHECK(at(q, 2, r, 0, j) == round_to_bf16(at(q0, 2, r, 0, j) * qs));
      CHECK(at(q, 2, r, 1, j) == round_to_bf16(at(q0, 2, r, 1, j)));  // head 1 below tau
      float ks = j < 4 ? sg : 1.0f;                                   // values untouched
      CHECK(at(kv, 2, r, 0, j) == round_to_bf16(at(kv0, 2, r, 0, j) * ks));
      CHECK(at(kv, 2, r, 1, j) == round_to_bf16(at(kv0, 2, r, 1, j)));
    }
  }
  Manifest m = artifact_manifest(o.out_dir);
  REQUIRE(m.qk_clip.applied);
  CHECK(m.qk_clip.threshold == 10.0);
  CHECK(m.qk_clip.gamma == std::vector<float>{g, 1.0f});
  CHECK(m.qk_clip.clipped_heads() == 1);
}

TEST_CASE("QK-Clip: only heads above tau change (test_verify_per_head_clipping)") {
  Fixture fx = make_deepseek("perhead", 3, 1);
  ExportOptions o = options(fx, "clipped.kiln");
  // The key form without attention_op, as a Linen sow tuple (`.0`), `/` separators.
  o.qk_clip = {10.0,
               {write_stats(fx, "stats.safetensors",
                            {{"decoder/dense_layers_0/self_attention/max_logits/0",
                              {{1, 3}, {40, 9.9f, 1}}}})
                    .string()}};
  export_artifact(o);
  const auto& q0 =
      fx.params.at("params.params.decoder.dense_layers_0.self_attention.wq_b.kernel").data;
  auto q = artifact_tensor(o.out_dir, 0, "attn.wq_b");
  const float g = gamma_of(10, 40);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t j = 0; j < 4; ++j) {
      CHECK(at(q, 3, r, 0, j) == round_to_bf16(at(q0, 3, r, 0, j) * std::sqrt(g)));
      CHECK(at(q, 3, r, 1, j) == round_to_bf16(at(q0, 3, r, 1, j)));
      CHECK(at(q, 3, r, 2, j) == round_to_bf16(at(q0, 3, r, 2, j)));
    }
}

TEST_CASE("QK-Clip: below the threshold the weights are bit-identical, wkv_a never changes") {
  Fixture fx = make_deepseek("below", 1, 1);
  ExportOptions plain = options(fx, "plain.kiln");
  export_artifact(plain);
  ExportOptions below = options(fx, "below.kiln");
  below.qk_clip = {100.0,
                   {write_stats(fx, "s50.safetensors", {{kStatsKey, {{1, 1}, {50}}}}).string()}};
  export_artifact(below);
  ExportOptions above = options(fx, "above.kiln");
  above.qk_clip = {10.0,
                   {write_stats(fx, "s100.safetensors", {{kStatsKey, {{1, 1}, {100}}}}).string()}};
  export_artifact(above);
  for (const char* name : {"attn.wq_b", "attn.wkv_b", "attn.wkv_a", "attn.wq_a", "attn.o"})
    CHECK(artifact_tensor(below.out_dir, 0, name) == artifact_tensor(plain.out_dir, 0, name));
  CHECK(artifact_tensor(above.out_dir, 0, "attn.wkv_a") ==
        artifact_tensor(plain.out_dir, 0, "attn.wkv_a"));
  CHECK(artifact_tensor(above.out_dir, 0, "attn.wq_b") !=
        artifact_tensor(plain.out_dir, 0, "attn.wq_b"));
}

TEST_CASE("QK-Clip: layers without statistics are untouched; stacked stats; per group") {
  Fixture fx = make_deepseek("layers", 2, 2);
  ExportOptions plain = options(fx, "plain.kiln");
  export_artifact(plain);

  SUBCASE("statistics for layer 1 only") {
    ExportOptions o = options(fx, "one.kiln");
    o.qk_clip = {10.0,
                 {write_stats(fx, "s.safetensors",
                              {{"intermediates.decoder.dense_layers_1.self_attention."
                                "attention_op.max_logits",
                                {{2, 2}, {30, 1, 25, 2}}}})  // batch 2: max over batch
                      .string()}};
    export_artifact(o);
    CHECK(artifact_tensor(o.out_dir, 0, "attn.wq_b") ==
          artifact_tensor(plain.out_dir, 0, "attn.wq_b"));
    CHECK(artifact_tensor(o.out_dir, 1, "attn.wq_b") !=
          artifact_tensor(plain.out_dir, 1, "attn.wq_b"));
    Manifest m = artifact_manifest(o.out_dir);
    CHECK(std::isnan(m.qk_clip.max_logit[0]));
    CHECK(m.qk_clip.gamma[0] == 1.0f);
    CHECK(m.qk_clip.max_logit[2] == 30.0f);
    CHECK(m.qk_clip.max_logit[3] == 2.0f);
  }
  SUBCASE("stacked [layers, batch, heads], per layer and per group") {
    Tensor stacked{{2, 1, 2}, {40, 1, 20, 2}};
    fs::path s = write_stats(fx, "stacked.safetensors",
                             {{"intermediates.decoder.dense_layers.self_attention.attention_op."
                               "max_logits.0",
                               stacked}});
    ExportOptions per_layer = options(fx, "per_layer.kiln");
    per_layer.qk_clip = {10.0, {s.string()}};
    export_artifact(per_layer);
    Manifest m = artifact_manifest(per_layer.out_dir);
    CHECK(m.qk_clip.gamma == std::vector<float>{gamma_of(10, 40), 1.0f, gamma_of(10, 20), 1.0f});
    ExportOptions per_group = options(fx, "per_group.kiln");
    per_group.qk_clip = {10.0, {s.string()}, true};
    export_artifact(per_group);
    m = artifact_manifest(per_group.out_dir);
    CHECK(m.qk_clip.gamma == std::vector<float>{gamma_of(10, 40), 1.0f, gamma_of(10, 40), 1.0f});
    CHECK(m.qk_clip.per_group);
  }
}

TEST_CASE("QK-Clip: bad statistics and non-MLA models are refused with a clear error") {
  Fixture fx = make_deepseek("errors", 2, 1);
  ExportOptions o = options(fx, "bad.kiln");
  SUBCASE("wrong head count") {
    o.qk_clip = {10.0,
                 {write_stats(fx, "h3.safetensors", {{kStatsKey, {{1, 3}, {1, 2, 3}}}}).string()}};
    CHECK_THROWS_WITH_AS(export_artifact(o), doctest::Contains("expected [..., 2]"), Error);
  }
  SUBCASE("no max-logit key") {
    o.qk_clip = {10.0,
                 {write_stats(fx, "none.safetensors", {{"something.else", {{1}, {1}}}}).string()}};
    CHECK_THROWS_WITH_AS(export_artifact(o), doctest::Contains("no max-logit statistics"), Error);
  }
  SUBCASE("threshold without statistics") {
    o.qk_clip.threshold = 10;
    CHECK_THROWS_WITH_AS(export_artifact(o), doctest::Contains("--max-logits"), Error);
  }
  CHECK_FALSE(fs::exists(o.out_dir));
}

TEST_CASE("QK-Clip: a Llama model needs --qk-clip-mode=query, which scales each query head") {
  const int64_t E = 8, H = 2, K = 1, D = 4, F = 8, V = 16;
  fs::path dir = fs::temp_directory_path() / "kiln_qk_clip_llama";
  fs::remove_all(dir);
  fs::create_directories(dir);
  TensorMap p;
  const std::string g = "params.params.", l = g + "decoder.layers_0.";
  p[g + "token_embedder.embedding"] = filled({V, E}, 1);
  p[g + "decoder.decoder_norm.scale"] = filled({E}, 2);
  p[g + "decoder.logits_dense.kernel"] = filled({E, V}, 3);
  p[l + "pre_self_attention_layer_norm.scale"] = filled({E}, 4);
  p[l + "post_self_attention_layer_norm.scale"] = filled({E}, 5);
  p[l + "self_attention.query.kernel"] = filled({E, H, D}, 6);
  p[l + "self_attention.key.kernel"] = filled({E, K, D}, 7);
  p[l + "self_attention.value.kernel"] = filled({E, K, D}, 8);
  p[l + "self_attention.out.kernel"] = filled({H, D, E}, 9);
  p[l + "mlp.wi_0.kernel"] = filled({E, F}, 10);
  p[l + "mlp.wi_1.kernel"] = filled({E, F}, 11);
  p[l + "mlp.wo.kernel"] = filled({F, E}, 12);
  write_safetensors(dir / "model.safetensors", p);
  nlohmann::json cfg = {{"decoder_block", "llama2"}, {"emb_dim", E},   {"num_query_heads", H},
                        {"num_kv_heads", K},         {"head_dim", D},  {"mlp_dim", F},
                        {"num_decoder_layers", 1},   {"vocab_size", V}};
  std::ofstream(dir / "config.json") << cfg.dump();
  write_safetensors(
      dir / "stats.safetensors",
      {{"decoder.layers_0.self_attention.attention_op.max_logits", {{1, 2}, {5, 40}}}});
  ExportOptions o;
  o.checkpoints = {(dir / "model.safetensors").string()};
  o.config_path = (dir / "config.json").string();
  o.out_dir = (dir / "out.kiln").string();
  o.weights_layout = TensorLayout::RowMajor;  // the check reads attn.q in MaxText's order
  o.qk_clip = {10.0, {(dir / "stats.safetensors").string()}};
  CHECK_THROWS_WITH_AS(export_artifact(o), doctest::Contains("only supported for MLA"), Error);
  o.qk_clip.mode = "query";
  export_artifact(o);
  auto q = artifact_tensor(o.out_dir, 0, "attn.q");
  const auto& q0 = p.at(l + "self_attention.query.kernel").data;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t d = 0; d < D; ++d) {
      CHECK(q[size_t((e * H + 0) * D + d)] == round_to_bf16(q0[size_t((e * H + 0) * D + d)]));
      CHECK(q[size_t((e * H + 1) * D + d)] ==
            round_to_bf16(q0[size_t((e * H + 1) * D + d)] * gamma_of(10, 40)));
    }
  const auto& k0 = p.at(l + "self_attention.key.kernel").data;
  auto k = artifact_tensor(o.out_dir, 0, "attn.k");
  for (size_t i = 0; i < k.size(); ++i) CHECK(k[i] == round_to_bf16(k0[i]));  // keys untouched
}

TEST_CASE("an interrupted export throws Interrupted and leaves nothing behind") {
  Fixture fx = make_deepseek("interrupt", 2, 1);
  ExportOptions o = options(fx, "interrupted.kiln");
  install_interrupt_handler();
  std::raise(SIGINT);  // as if Ctrl-C arrived while the export ran
  REQUIRE(interrupted());
  CHECK_THROWS_AS(export_artifact(o), Interrupted);
  clear_interrupted();
  CHECK_FALSE(fs::exists(o.out_dir));
  for (const auto& e : fs::directory_iterator(fx.dir))
    CHECK(e.path().filename().string().find("kiln-tmp") == std::string::npos);
}

namespace {

// The engine's part in --qk-clip-calibrate, faked: layer l's heads measure `raw` while no layer
// before l is clipped in the artifact measured, and half of it once one is (a clip lowers the
// logits downstream).
class FakeCalibrator final : public MaxLogitCalibrator {
 public:
  FakeCalibrator(int64_t H, std::vector<float> raw) : H_(H), raw_(std::move(raw)) {}

  std::vector<float> max_logits(const std::string& artifact_dir) override {
    const Manifest m = artifact_manifest(artifact_dir);
    REQUIRE(m.qk_clip.applied);
    passes.push_back(m.qk_clip.gamma);
    std::vector<float> s = raw_;
    bool clipped_before = false;
    for (size_t l = 0; l < s.size() / size_t(H_); ++l) {
      for (size_t h = 0; h < size_t(H_); ++h) {
        if (clipped_before) s[l * size_t(H_) + h] *= 0.5f;
      }
      for (size_t h = 0; h < size_t(H_); ++h)
        clipped_before = clipped_before || m.qk_clip.gamma[l * size_t(H_) + h] < 1.0f;
    }
    return s;
  }
  std::string source() const override { return "prompts.txt"; }

  std::vector<std::vector<float>> passes;  // the gammas of each artifact measured

 private:
  int64_t H_;
  std::vector<float> raw_;
};

}  // namespace

TEST_CASE(
    "QK-Clip calibration: layer l is measured with layers 0..l-1 clipped, one pass per clip") {
  Fixture fx = make_deepseek("calibrate", 2, 4);
  const float tau = 10;
  // Layer 0 head 1 is above tau; layer 2 stays above it once halved; layers 1 and 3 fall below.
  FakeCalibrator cal(2, {1, 40, 15, 2, 50, 3, 12, 1});
  ExportOptions o = options(fx, "calibrated.kiln");
  o.qk_clip.threshold = tau;
  o.qk_clip.calibrator = &cal;
  const ExportSummary s = export_artifact(o);

  // Measured: the unclipped model (layer 0), then with layer 0 clipped (layers 1 and 2), then
  // with layers 0 and 2 clipped (layer 3).
  const std::vector<float> measured = {1, 40, 7.5f, 1, 25, 1.5f, 6, 0.5f};
  std::vector<float> gamma;
  for (float m : measured) gamma.push_back(qk_clip_gamma(m, tau));
  REQUIRE(cal.passes.size() == 3);
  CHECK(cal.passes[0] == std::vector<float>(8, 1.0f));
  CHECK(cal.passes[1] == std::vector<float>{1, gamma[1], 1, 1, 1, 1, 1, 1});
  CHECK(cal.passes[2] == std::vector<float>{1, gamma[1], 1, 1, gamma[4], 1, 1, 1});
  CHECK(gamma[1] == gamma_of(tau, 40));
  CHECK(s.qk_clip.max_logit == measured);
  CHECK(s.qk_clip.gamma == gamma);
  const Manifest m = artifact_manifest(o.out_dir);
  CHECK(m.qk_clip.gamma == gamma);
  CHECK(m.qk_clip.sources == std::vector<std::string>{"prompts.txt (sequential calibration)"});

  // The weights are those of an export given the measured statistics as a file.
  TensorMap stats;
  for (int64_t l = 0; l < 4; ++l)
    stats["decoder.layers_" + std::to_string(l) + ".self_attention.attention_op.max_logits"] = {
        {1, 2}, {measured[size_t(2 * l)], measured[size_t(2 * l + 1)]}};
  ExportOptions from_file = options(fx, "from_file.kiln");
  from_file.qk_clip = {tau, {write_stats(fx, "measured.safetensors", stats).string()}};
  export_artifact(from_file);
  for (int64_t l = 0; l < 4; ++l)
    for (const char* t : {"attn.wq_b", "attn.wkv_b"}) {
      CAPTURE(l);
      CAPTURE(t);
      CHECK(artifact_tensor(o.out_dir, l, t) == artifact_tensor(from_file.out_dir, l, t));
    }
  // The scratch artifacts are gone.
  for (const auto& e : fs::directory_iterator(fx.dir))
    CHECK(e.path().filename().string().find("kiln-calibrate") == std::string::npos);
}
