#include "export/key_layout.h"

#include <doctest/doctest.h>

#include <functional>
#include <string>
#include <vector>

#include "common/error.h"

using kiln::canonical_key;
using kiln::detect_key_layout;
using kiln::KeyLayout;
using kiln::split_key;
using Strings = std::vector<std::string>;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("key_layout: split_key on '/' or '.', keeping LoRA leaf names whole") {
  CHECK(split_key("params.params.decoder.layers.self_attention.query.kernel") ==
        Strings{"params", "params", "decoder", "layers", "self_attention", "query", "kernel"});
  CHECK(split_key("params/params/decoder/layers_0/mlp/wi_0/kernel") ==
        Strings{"params", "params", "decoder", "layers_0", "mlp", "wi_0", "kernel"});
  CHECK(
      split_key("params.params.decoder.layers.self_attention.query.lora_a.kernel") ==
      Strings{"params", "params", "decoder", "layers", "self_attention", "query", "lora_a.kernel"});
  CHECK(split_key("decoder.layers_0.self_attention.out.lora_b.kernel.value") ==
        Strings{"decoder", "layers_0", "self_attention", "out", "lora_b.kernel", "value"});
  // With '/' separators the dot is already inside one component.
  CHECK(split_key("params/params/decoder/layers/self_attention/key/lora_b.kernel") ==
        Strings{"params", "params", "decoder", "layers", "self_attention", "key", "lora_b.kernel"});
  // "lora_a" not followed by "kernel" is an ordinary component.
  CHECK(split_key("a.lora_a.scale") == Strings{"a", "lora_a", "scale"});
  // JAX keystr forms of the in-memory NNX train state and the Linen dict.
  CHECK(split_key("['model']['decoder']['layers']['self_attention']['query']['kernel'].value") ==
        Strings{"model", "decoder", "layers", "self_attention", "query", "kernel", "value"});
  CHECK(split_key(".params['params']['decoder']['decoder_norm']['scale']") ==
        Strings{"params", "params", "decoder", "decoder_norm", "scale"});
  CHECK(split_key("['optimizer']['opt_state'][0]['mu']['decoder'].value") ==
        Strings{"optimizer", "opt_state", "0", "mu", "decoder", "value"});
  CHECK(split_key("step") == Strings{"step"});
  CHECK(split_key("").empty());
}

TEST_CASE("key_layout: MaxText Linen training checkpoint") {
  const Strings keys = {
      "params.params.decoder.layers.self_attention.query.kernel",
      "params.params.decoder.layers.mlp.wi_0.kernel",
      "params.params.decoder.decoder_norm.scale",
      "params.params.token_embedder.embedding",
      "opt_state.0.mu.params.decoder.layers.self_attention.query.kernel",
      "opt_state.0.nu.params.token_embedder.embedding",
      "opt_state.0.count",
      "opt_state.mu.params.decoder.decoder_norm.scale",
      "step",
      "nnx_aux.decoder.rngs.dropout.key",  // pure_nnx training checkpoints use the Linen layout
  };
  const KeyLayout l = detect_key_layout(keys, "ckpt.safetensors");
  CHECK(l == KeyLayout::MaxTextLinen);
  CHECK(kiln::key_layout_name(l) == "maxtext-linen");
  CHECK(canonical_key(keys[0], l) == "decoder/layers/self_attention/query/kernel");
  CHECK(canonical_key(keys[2], l) == "decoder/decoder_norm/scale");
  CHECK(canonical_key(keys[3], l) == "token_embedder/embedding");
  for (size_t i = 4; i < keys.size(); ++i) CHECK_FALSE(canonical_key(keys[i], l).has_value());
}

TEST_CASE("key_layout: MaxText Linen decode checkpoint with '/' and LoRA leaves") {
  const Strings keys = {
      "params/params/decoder/layers_0/self_attention/query/kernel",
      "params/params/decoder/layers_1/self_attention/query/kernel",
      "params/params/decoder/layers_0/self_attention/query/lora_a.kernel",
      "params.params.decoder.layers_0.self_attention.query.lora_b.kernel",
      "step",
  };
  const KeyLayout l = detect_key_layout(keys, "ckpt");
  CHECK(l == KeyLayout::MaxTextLinen);
  CHECK(canonical_key(keys[1], l) == "decoder/layers_1/self_attention/query/kernel");
  CHECK(canonical_key(keys[2], l) == "decoder/layers_0/self_attention/query/lora_a.kernel");
  CHECK(canonical_key(keys[3], l) == "decoder/layers_0/self_attention/query/lora_b.kernel");
}

TEST_CASE("key_layout: MaxText NNX layouts") {
  SUBCASE("decode checkpoint: attribute roots with a value leaf") {
    const Strings keys = {
        "decoder/layers_0/self_attention/query/kernel/value",
        "decoder/decoder_norm/scale/value",
        "token_embedder/embedding/value",
        "decoder.logits_dense.kernel.value",
    };
    const KeyLayout l = detect_key_layout(keys, "ckpt");
    CHECK(l == KeyLayout::MaxTextNnx);
    CHECK(kiln::key_layout_name(l) == "maxtext-nnx");
    CHECK(canonical_key(keys[0], l) == "decoder/layers_0/self_attention/query/kernel");
    CHECK(canonical_key(keys[1], l) == "decoder/decoder_norm/scale");
    CHECK(canonical_key(keys[2], l) == "token_embedder/embedding");
    CHECK(canonical_key(keys[3], l) == "decoder/logits_dense/kernel");
  }
  SUBCASE("in-memory train state: model/… plus optimizer state") {
    const Strings keys = {
        "model.decoder.layers.self_attention.query.kernel",
        "model/decoder/layers/mlp/wo/kernel/value",
        "model.token_embedder.embedding.value",
        "['model']['decoder']['decoder_norm']['scale'].value",
        "optimizer.opt_state.0.mu.decoder.layers.mlp.wo.kernel",
        "['optimizer']['step'].value",
    };
    const KeyLayout l = detect_key_layout(keys, "ckpt");
    CHECK(l == KeyLayout::MaxTextNnx);
    CHECK(canonical_key(keys[0], l) == "decoder/layers/self_attention/query/kernel");
    CHECK(canonical_key(keys[1], l) == "decoder/layers/mlp/wo/kernel");
    CHECK(canonical_key(keys[2], l) == "token_embedder/embedding");
    CHECK(canonical_key(keys[3], l) == "decoder/decoder_norm/scale");
    CHECK_FALSE(canonical_key(keys[4], l).has_value());
    CHECK_FALSE(canonical_key(keys[5], l).has_value());
  }
  SUBCASE("pure dict without value leaves, optional base/ prefix, LoRA") {
    const Strings keys = {
        "decoder.layers.self_attention.query.kernel",
        "base/decoder/layers/self_attention/key/kernel/value",
        "decoder.layers.self_attention.value.lora_a.kernel",
        "nnx_aux/decoder/rngs/count",
        "mtp_block/mtp_layer_1/projection/kernel/value",
    };
    const KeyLayout l = detect_key_layout(keys, "ckpt");
    CHECK(l == KeyLayout::MaxTextNnx);
    CHECK(canonical_key(keys[0], l) == "decoder/layers/self_attention/query/kernel");
    CHECK(canonical_key(keys[1], l) == "decoder/layers/self_attention/key/kernel");
    CHECK(canonical_key(keys[2], l) == "decoder/layers/self_attention/value/lora_a.kernel");
    CHECK_FALSE(canonical_key(keys[3], l).has_value());
    CHECK(canonical_key(keys[4], l) == "mtp_block/mtp_layer_1/projection/kernel");
  }
}

TEST_CASE("key_layout: mixed, unknown and parameter-less key sets are rejected") {
  SUBCASE("mixed layouts list examples of both") {
    const std::string msg = error_of([] {
      detect_key_layout(
          {"params.params.decoder.decoder_norm.scale", "decoder/layers_0/mlp/wo/kernel/value",
           "params.params.token_embedder.embedding"},
          "ckpt.safetensors");
    });
    CHECK(msg.starts_with("ckpt.safetensors: "));
    CHECK(contains(msg, "mix"));
    CHECK(contains(msg, "'params.params.decoder.decoder_norm.scale'"));
    CHECK(contains(msg, "'decoder/layers_0/mlp/wo/kernel/value'"));
    CHECK(msg.find('\n') == std::string::npos);
  }
  SUBCASE("unknown keys: at most three examples and a count") {
    const std::string msg = error_of([] {
      detect_key_layout({"params.params.decoder.decoder_norm.scale", "model.embed_tokens.weight",
                         "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                         "model.layers.1.self_attn.q_proj.weight", "params.decoder.x"},
                        "hf.safetensors");
    });
    CHECK(msg.starts_with("hf.safetensors: "));
    CHECK(contains(msg, "5 key(s) match no known layout"));
    CHECK(contains(msg, "'lm_head.weight'"));
    CHECK(contains(msg, "(and 2 more)"));
    CHECK_FALSE(contains(msg, "params.decoder.x"));
    CHECK(contains(msg, "Hugging Face"));
    CHECK(msg.find('\n') == std::string::npos);
  }
  SUBCASE("empty components are not recognised") {
    CHECK(contains(error_of([] { detect_key_layout({"params//params/decoder/x"}, "f"); }),
                   "match no known layout"));
    CHECK(contains(error_of([] { detect_key_layout({"decoder..x"}, "f"); }),
                   "match no known layout"));
    CHECK(
        contains(error_of([] { detect_key_layout({"['model'"}, "f"); }), "match no known layout"));
  }
  SUBCASE("only optimizer state") {
    CHECK(contains(error_of([] {
                     detect_key_layout({"step", "opt_state.0.count"}, "f");
                   }),
                   "no model parameters"));
    CHECK(contains(error_of([] { detect_key_layout({}, "f"); }), "no model parameters"));
  }
  SUBCASE("canonical_key refuses a key of the other layout") {
    const std::string msg = error_of([] {
      (void)canonical_key("decoder/layers_0/mlp/wo/kernel/value", KeyLayout::MaxTextLinen);
    });
    CHECK(contains(msg, "'decoder/layers_0/mlp/wo/kernel/value'"));
    CHECK(contains(msg, "maxtext-linen"));
  }
}

TEST_CASE("unrolled_layer_index: GROUP_N with N a decimal number that fits in 64 bits") {
  using kiln::unrolled_layer_index;
  CHECK(unrolled_layer_index("layers_0", "layers") == 0);
  CHECK(unrolled_layer_index("layers_12", "layers") == 12);
  CHECK(unrolled_layer_index("moe_layers_3", "moe_layers") == 3);
  CHECK(unrolled_layer_index("layers_9223372036854775807", "layers") == INT64_MAX);
  // Too large for int64: no layer (a library exception before), not a wrapped number.
  CHECK(unrolled_layer_index("layers_9223372036854775808", "layers") == std::nullopt);
  CHECK(unrolled_layer_index("layers_99999999999999999999", "layers") == std::nullopt);
  for (const char* not_layer : {"layers", "layers_", "layers_-1", "layers_+1", "layers_1a",
                                "layers_ 1", "layersX1", "moe_layers_1"})
    CHECK_MESSAGE(unrolled_layer_index(not_layer, "layers") == std::nullopt, not_layer);
}
