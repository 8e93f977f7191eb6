#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/crc32c.h"
#include "common/error.h"
#include "kiln_generated.h"
#include "schema/format.h"
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
  Manifest r = parse_manifest(bytes.data(), bytes.size(), "manifest.kfb", true);
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

// The manifest writer and reader address each field by its position in visit_fields(): the list
// must name kiln.fbs's fields in the schema's order, each in the schema's type.
TEST_CASE("visit_fields lists kiln.fbs's ModelConfig fields in order, with their types") {
  const flatbuffers::TypeTable* schema = fb::ModelConfigTypeTable();
  const ModelConfig config;
  size_t i = 0;
  visit_fields(config, [&](const char* name, const auto& value, const auto&) {
    using T = std::decay_t<decltype(value)>;
    INFO("field ", i, ": ", name);
    REQUIRE(i < schema->num_elems);
    CHECK(std::string(name) == schema->names[i]);
    const flatbuffers::TypeCode code = schema->type_codes[i++];
    CHECK(code.is_repeating == 0);
    const auto type = flatbuffers::ElementaryType(code.base_type);
    if constexpr (std::is_same_v<T, int64_t>) {
      CHECK(type == flatbuffers::ET_LONG);
    } else if constexpr (std::is_same_v<T, double>) {
      CHECK(type == flatbuffers::ET_DOUBLE);
    } else if constexpr (std::is_same_v<T, bool>) {
      CHECK(type == flatbuffers::ET_BOOL);
    } else if constexpr (std::is_same_v<T, std::string>) {
      CHECK(type == flatbuffers::ET_STRING);
    } else {
      static_assert(std::is_same_v<T, RopeLayout>, "a field type the manifest cannot store");
      CHECK(type == flatbuffers::ET_UCHAR);
      REQUIRE(code.sequence_ref >= 0);
      CHECK(schema->type_refs[code.sequence_ref]() == fb::RopeLayoutTypeTable());
    }
  });
  CHECK(i == schema->num_elems);
  for (const RopeLayout r : {RopeLayout::HalfSplit, RopeLayout::Interleaved, RopeLayout::Yarn})
    CHECK(std::string(fb::EnumNameRopeLayout(static_cast<fb::RopeLayout>(r))) ==
          std::vector<std::string>{"HalfSplit", "Interleaved", "Yarn"}[size_t(r)]);
}

TEST_CASE("parse_manifest refuses garbage and truncation") {
  Manifest m;
  m.config = small_config();
  std::vector<uint8_t> bytes = serialize_manifest(m);
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(bytes.size() / 2));
  for (bool verify : {true, false}) {
    CHECK_THROWS_WITH_AS(parse_manifest(cut.data(), cut.size(), "m.kfb", verify),
                         doctest::Contains("m.kfb: manifest fails FlatBuffers verification"),
                         Error);
    std::vector<uint8_t> junk(64, 0xab);
    CHECK_THROWS_WITH_AS(parse_manifest(junk.data(), junk.size(), "m.kfb", verify),
                         doctest::Contains("m.kfb: not a kiln manifest"), Error);
  }
}

TEST_CASE("the manifest ends in a checksum trailer that old readers skip") {
  Manifest m;
  m.config = small_config();
  const std::vector<uint8_t> bytes = serialize_manifest(m);
  REQUIRE(bytes.size() > kManifestTrailerSize);
  const size_t fb_size = bytes.size() - kManifestTrailerSize;
  CHECK(std::memcmp(bytes.data() + fb_size, "KILNMCRC", 8) == 0);
  uint32_t crc = 0, zero = 1;
  std::memcpy(&crc, bytes.data() + fb_size + 8, 4);
  std::memcpy(&zero, bytes.data() + fb_size + 12, 4);
  CHECK(crc == crc32c(bytes.data(), fb_size));
  CHECK(zero == 0);
  // A reader before format 1.3 verifies the whole file as the FlatBuffer: trailing bytes pass.
  flatbuffers::Verifier whole(bytes.data(), bytes.size());
  CHECK(fb::VerifyManifestBuffer(whole));
  flatbuffers::Verifier exact(bytes.data(), fb_size);
  CHECK(fb::VerifyManifestBuffer(exact));
  CHECK(fb::GetManifest(bytes.data())->format_minor() == kFormatMinor);
  CHECK(kFormatMinor >= 3);
}

TEST_CASE("a manifest without or failing its checksum is refused unless verification is off") {
  Manifest m;
  m.config = small_config();
  m.config.normalization_layer_epsilon = 1.2345e-5;  // a bit pattern found once in the bytes
  const std::vector<uint8_t> bytes = serialize_manifest(m);

  // Written by a kiln before format 1.3: the FlatBuffer alone.
  const std::vector<uint8_t> old(bytes.begin(), bytes.end() - long(kManifestTrailerSize));
  CHECK_THROWS_WITH_AS(parse_manifest(old.data(), old.size(), "m.kfb", true),
                       doctest::Contains("m.kfb: has no checksum (written by a kiln before format "
                                         "1.3); re-export it, or pass --no-verify"),
                       Error);
  CHECK(parse_manifest(old.data(), old.size(), "m.kfb", false).config.normalization_layer_epsilon ==
        1.2345e-5);

  // normalization_layer_epsilon edited in place.
  std::vector<uint8_t> edited = bytes;
  const double from = 1.2345e-5, to = 1e-3;
  auto at = std::search(edited.begin(), edited.end(), reinterpret_cast<const uint8_t*>(&from),
                        reinterpret_cast<const uint8_t*>(&from) + 8);
  REQUIRE(at != edited.end());
  std::memcpy(&*at, &to, 8);
  CHECK_THROWS_WITH_AS(parse_manifest(edited.data(), edited.size(), "m.kfb", true),
                       doctest::Contains("m.kfb: checksum mismatch (the manifest was edited or is "
                                         "corrupt)"),
                       Error);
  CHECK(parse_manifest(edited.data(), edited.size(), "m.kfb", false)
            .config.normalization_layer_epsilon == 1e-3);

  // A damaged trailer: the CRC itself, or its reserved word.
  for (size_t pos : {bytes.size() - 8, bytes.size() - 1}) {
    std::vector<uint8_t> bad = bytes;
    bad[pos] ^= 0x10;
    CHECK_THROWS_WITH_AS(parse_manifest(bad.data(), bad.size(), "m.kfb", true),
                         doctest::Contains("checksum mismatch"), Error);
    CHECK_NOTHROW(parse_manifest(bad.data(), bad.size(), "m.kfb", false));
  }
}

TEST_CASE("parse_manifest: a crafted QK-Clip record or vocabulary is refused, never multiplied") {
  Manifest m;
  m.config = small_config();
  m.blobs.push_back({"globals.kblob", -1, LayerKind::Globals, 1024, 7});
  auto round_trip = [](const Manifest& x) {
    const std::vector<uint8_t> bytes = serialize_manifest(x);
    return parse_manifest(bytes.data(), bytes.size(), "art/manifest.kfb", true);
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
