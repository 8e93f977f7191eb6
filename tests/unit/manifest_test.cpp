#include "schema/manifest.h"

#include <doctest/doctest.h>

#include "common/error.h"

using namespace kiln;

namespace {

Manifest small_manifest() {
  Manifest m;
  ModelConfig& c = m.config;
  c.decoder_block = "llama2";
  c.emb_dim = 64;
  c.num_query_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.mlp_dim = 128;
  c.num_decoder_layers = 2;
  c.vocab_size = 256;
  m.blobs.push_back({"globals.kblob", -1, LayerKind::Globals, 1024, 7});
  return m;
}

Manifest round_trip(const Manifest& m) {
  const std::vector<uint8_t> bytes = serialize_manifest(m);
  return parse_manifest(bytes.data(), bytes.size(), "art/manifest.kfb");
}

}  // namespace

TEST_CASE("manifest: a crafted QK-Clip record is refused, its sizes never multiplied unchecked") {
  Manifest m = small_manifest();
  m.qk_clip.applied = true;
  m.qk_clip.threshold = 100;
  m.qk_clip.heads = 4;
  m.qk_clip.gamma.assign(8, 1.0f);
  m.qk_clip.max_logit.assign(8, 1.0f);
  CHECK(round_trip(m).qk_clip.gamma.size() == 8);

  m.qk_clip.heads = int64_t(1) << 62;  // layers × heads would overflow int64
  CHECK_THROWS_WITH_AS(round_trip(m),
                       "art/manifest.kfb: QK-Clip record has 4611686018427387904 "
                       "heads, the config 4 query heads",
                       Error);
  m.qk_clip.heads = 4;
  m.qk_clip.gamma.pop_back();
  CHECK_THROWS_WITH_AS(round_trip(m), doctest::Contains("expected 8 gammas"), Error);
}

TEST_CASE("manifest: a vocabulary whose tensors' sizes wrap is refused on parse") {
  Manifest m = small_manifest();
  m.config.vocab_size = int64_t(1) << 58;  // 2^58 × 64 × 2 bytes wraps to 0 in 64 bits
  CHECK_THROWS_WITH_AS(round_trip(m), doctest::Contains("art/manifest.kfb: vocab_size"), Error);
}
