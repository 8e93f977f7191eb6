// Canonical artifact tensor names ← MaxText parameter paths (docs/maxtext.md §1.3, §1.4, §1.6,
// §1.7). Shared by the exporter (base weights) and the LoRA reader (adapter targets are the same
// modules: `<path without /kernel>/lora_a.kernel`).
#pragma once

#include <cstddef>
#include <string>

#include "common/error.h"

namespace kiln {

struct NameMapping {
  const char* name;
  const char* maxtext;
};

inline constexpr NameMapping kGlobalNames[] = {
    {"token_embedding", "token_embedder/embedding"},
    {"final_norm", "decoder/decoder_norm/scale"},
    {"logits_dense", "decoder/logits_dense/kernel"},
};

inline constexpr NameMapping kLlamaLayerNames[] = {
    {"pre_attn_norm", "pre_self_attention_layer_norm/scale"},
    {"attn.q", "self_attention/query/kernel"},
    {"attn.k", "self_attention/key/kernel"},
    {"attn.v", "self_attention/value/kernel"},
    {"attn.o", "self_attention/out/kernel"},
    {"attn.q_norm", "self_attention/query_norm/scale"},
    {"attn.k_norm", "self_attention/key_norm/scale"},
    {"post_attn_norm", "post_self_attention_layer_norm/scale"},
    {"mlp.wi_0", "mlp/wi_0/kernel"},
    {"mlp.wi_1", "mlp/wi_1/kernel"},
    {"mlp.wo", "mlp/wo/kernel"},
};

inline constexpr NameMapping kDeepSeekLayerNames[] = {
    {"pre_attn_norm", "pre_self_attention_layer_norm/scale"},
    {"attn.wq_a", "self_attention/wq_a/kernel"},
    {"attn.q_a_norm", "self_attention/q_norm/scale"},
    {"attn.wq_b", "self_attention/wq_b/kernel"},
    {"attn.query", "self_attention/query/kernel"},
    {"attn.wkv_a", "self_attention/wkv_a/kernel"},
    {"attn.kv_a_norm", "self_attention/kv_norm/scale"},
    {"attn.wkv_b", "self_attention/wkv_b/kernel"},
    {"attn.o", "self_attention/out/kernel"},
    {"post_attn_norm", "post_self_attention_layer_norm/scale"},
    {"mlp.wi_0", "mlp/wi_0/kernel"},
    {"mlp.wi_1", "mlp/wi_1/kernel"},
    {"mlp.wo", "mlp/wo/kernel"},
    {"moe.gate", "DeepSeekMoeBlock_0/MoeBlock_0/gate/kernel"},
    {"moe.gate_bias", "DeepSeekMoeBlock_0/MoeBlock_0/gate/bias"},
    {"moe.experts.wi_0", "DeepSeekMoeBlock_0/MoeBlock_0/wi_0"},
    {"moe.experts.wi_1", "DeepSeekMoeBlock_0/MoeBlock_0/wi_1"},
    {"moe.experts.wo", "DeepSeekMoeBlock_0/MoeBlock_0/wo"},
    {"moe.shared.wi_0", "DeepSeekMoeBlock_0/shared_experts/wi_0/kernel"},
    {"moe.shared.wi_1", "DeepSeekMoeBlock_0/shared_experts/wi_1/kernel"},
    {"moe.shared.wo", "DeepSeekMoeBlock_0/shared_experts/wo/kernel"},
};

template <size_t N>
const char* maxtext_path(const NameMapping (&table)[N], const std::string& name) {
  for (const auto& m : table)
    if (name == m.name) return m.maxtext;
  throw Error("internal: no MaxText name for tensor '" + name + "'");
}

}  // namespace kiln
