#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>

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
