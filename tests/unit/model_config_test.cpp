#include <doctest/doctest.h>

#include <limits>

#include "common/error.h"
#include "schema/manifest.h"

using namespace kiln;

static ModelConfig small_config() {
  ModelConfig c;
  c.decoder_block = "llama2";
  c.emb_dim = 64;
  c.num_query_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.mlp_dim = 128;
  c.num_decoder_layers = 2;
  c.vocab_size = 256;
  return c;
}

TEST_CASE("validate accepts a consistent config and names the first bad field") {
  ModelConfig c = small_config();
  CHECK_NOTHROW(c.validate("cfg.json"));
  c.num_kv_heads = 3;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("num_kv_heads"), Error);
  c = small_config();
  c.decoder_block = "gpt3";
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("decoder_block 'gpt3'"), Error);
  c = small_config();
  c.head_dim = 15;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("head_dim"), Error);
  c = small_config();
  c.vocab_size = 0;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("cfg.json: vocab_size"), Error);
}

TEST_CASE("validate refuses infinite or NaN hyper-parameters (YAML reads 1e999 as infinity)") {
  ModelConfig c = small_config();
  c.normalization_layer_epsilon = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(c.validate("cfg.yml"),
                       "cfg.yml: normalization_layer_epsilon must be a finite number, got inf",
                       Error);
  c = small_config();
  c.rope_max_timescale = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(c.validate("cfg.yml"), doctest::Contains("rope_max_timescale"), Error);
  c = small_config();
  c.final_logits_soft_cap = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(c.validate("cfg.yml"), doctest::Contains("final_logits_soft_cap"), Error);
}

TEST_CASE("tensor specs follow the config") {
  ModelConfig c = small_config();
  auto layer = layer_tensor_specs(c, 0);
  CHECK(layer.size() == 9);
  CHECK(layer[1].name == "attn.q");
  CHECK(layer[1].shape == std::vector<int64_t>{64, 4, 16});
  CHECK(layer[4].shape == std::vector<int64_t>{4, 16, 64});
  c.use_qk_norm = true;
  CHECK(layer_tensor_specs(c, 0).size() == 11);
  CHECK(global_tensor_specs(c).size() == 3);
  c.logits_via_embedding = true;
  CHECK(global_tensor_specs(c).size() == 2);
}

TEST_CASE("manifest round trip keeps every field") {
  Manifest m;
  m.config = small_config();
  m.config.model_name = "llama3.1-tiny";
  m.config.rope_layout = RopeLayout::Interleaved;
  m.config.query_scale = 0.25;
  m.config.rope_use_scale = false;  // a false that equals no default must survive too
  m.blobs.push_back({"globals.kblob", -1, LayerKind::Globals, 1234, 0xdeadbeef});
  m.blobs.push_back({"layer-000.kblob", 0, LayerKind::Dense, 99, 7});
  m.provenance.key_layout = "maxtext-linen";
  m.provenance.scanned = true;
  m.provenance.scan_axis = 0;
  m.provenance.sources.emplace_back("a.safetensors", 42);
  m.provenance.options.emplace_back("--force", "");
  std::vector<uint8_t> bytes = serialize_manifest(m);
  Manifest r = parse_manifest(bytes.data(), bytes.size(), "manifest.kfb");
  CHECK(r.config.model_name == "llama3.1-tiny");
  CHECK(r.config.rope_layout == RopeLayout::Interleaved);
  CHECK(r.config.query_scale == 0.25);
  CHECK(r.config.rope_use_scale == false);
  CHECK(r.config.num_kv_heads == 2);
  REQUIRE(r.blobs.size() == 2);
  CHECK(r.blobs[0].header_crc32c == 0xdeadbeefu);
  CHECK(r.blobs[1].layer == 0);
  CHECK(r.provenance.scan_axis == 0);
  CHECK(r.provenance.sources[0].second == 42);
}

TEST_CASE("parse_manifest refuses garbage and truncation") {
  Manifest m;
  m.config = small_config();
  std::vector<uint8_t> bytes = serialize_manifest(m);
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(bytes.size() / 2));
  CHECK_THROWS_AS(parse_manifest(cut.data(), cut.size(), "m.kfb"), Error);
  std::vector<uint8_t> junk(64, 0xab);
  CHECK_THROWS_WITH_AS(parse_manifest(junk.data(), junk.size(), "m.kfb"),
                       doctest::Contains("m.kfb: not a kiln manifest"), Error);
}

TEST_CASE("parse_manifest: a crafted QK-Clip record or vocabulary is refused, never multiplied") {
  Manifest m;
  m.config = small_config();
  m.blobs.push_back({"globals.kblob", -1, LayerKind::Globals, 1024, 7});
  auto round_trip = [](const Manifest& x) {
    const std::vector<uint8_t> bytes = serialize_manifest(x);
    return parse_manifest(bytes.data(), bytes.size(), "art/manifest.kfb");
  };
  m.qk_clip.applied = true;
  m.qk_clip.threshold = 100;
  m.qk_clip.heads = 4;
  m.qk_clip.gamma.assign(8, 1.0f);
  m.qk_clip.max_logit.assign(8, 1.0f);
  CHECK(round_trip(m).qk_clip.gamma.size() == 8);
  m.qk_clip.heads = int64_t(1) << 62;  // layers × heads would overflow int64
  CHECK_THROWS_WITH_AS(round_trip(m),
                       "art/manifest.kfb: QK-Clip record has 4611686018427387904 heads, the "
                       "config 4 query heads",
                       Error);
  m.qk_clip.heads = 4;
  m.qk_clip.gamma.pop_back();
  CHECK_THROWS_WITH_AS(round_trip(m), doctest::Contains("expected 8 gammas"), Error);
  m.qk_clip = {};
  m.config.vocab_size = int64_t(1) << 58;  // 2^58 × 64 × 2 bytes wraps to 0 in 64 bits
  CHECK_THROWS_WITH_AS(round_trip(m), doctest::Contains("art/manifest.kfb: vocab_size"), Error);
}

TEST_CASE("validate refuses sizes that would wrap: every tensor and cache must be addressable") {
  ModelConfig c = small_config();
  c.vocab_size = int64_t(1) << 58;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"),
                       "cfg.json: vocab_size 288230376151711744 is larger than 2147483647", Error);
  c = small_config();
  c.num_decoder_layers = int64_t(1) << 40;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("num_decoder_layers"), Error);
  // Each dimension in range, their product in f32 not: [E, F] = 2^31-1 × 2^31-1 × 4 bytes.
  c = small_config();
  c.emb_dim = INT32_MAX;
  c.mlp_dim = INT32_MAX;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"),
                       doctest::Contains("cfg.json: tensor 'mlp.wi_0' of shape [2147483647, "
                                         "2147483647] is too large to address"),
                       Error);
  // The attention cache of one sequence: context × kv heads × head_dim.
  c = small_config();
  c.max_target_length = INT32_MAX;
  c.num_kv_heads = 1 << 20;
  c.num_query_heads = 1 << 20;
  c.head_dim = 1 << 20;
  CHECK_THROWS_WITH_AS(c.validate("cfg.json"), doctest::Contains("too large to address"), Error);
  // DeepSeek: the MoE layer (the last) is checked as well as the dense one.
  ModelConfig d;
  d.decoder_block = "deepseek";
  d.rope_layout = RopeLayout::Yarn;
  d.emb_dim = 64;
  d.num_query_heads = d.num_kv_heads = 4;
  d.num_decoder_layers = 2;
  d.first_num_dense_layers = 1;
  d.mlp_dim = 128;
  d.vocab_size = 256;
  d.kv_lora_rank = 32;
  d.qk_nope_head_dim = 16;
  d.qk_rope_head_dim = 8;
  d.v_head_dim = 16;
  d.num_experts = 4;
  d.num_experts_per_tok = 2;
  d.moe_mlp_dim = 32;
  d.original_max_position_embeddings = 64;
  d.rope_factor = 4;
  CHECK_NOTHROW(d.validate("ds.json"));
  d.num_experts = 1 << 30;
  d.moe_mlp_dim = 1 << 30;
  CHECK_THROWS_WITH_AS(d.validate("ds.json"), doctest::Contains("'moe.experts.wi_0'"), Error);
}
