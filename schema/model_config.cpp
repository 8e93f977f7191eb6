#include "schema/model_config.h"

#include <cmath>

#include "common/error.h"

namespace kiln {

namespace {

void require_positive(const std::string& where, const char* field, int64_t v) {
  if (v <= 0) throw Error(where + ": " + field + " must be positive, got " + std::to_string(v));
}

}  // namespace

void ModelConfig::validate(const std::string& where) const {
  if (decoder_block != "llama2" && decoder_block != "mistral" && decoder_block != "qwen3")
    throw Error(where + ": decoder_block '" + decoder_block +
                "' is not supported (expected llama2, mistral or qwen3)");
  require_positive(where, "emb_dim", emb_dim);
  require_positive(where, "num_query_heads", num_query_heads);
  require_positive(where, "num_kv_heads", num_kv_heads);
  require_positive(where, "head_dim", head_dim);
  require_positive(where, "mlp_dim", mlp_dim);
  require_positive(where, "num_decoder_layers", num_decoder_layers);
  require_positive(where, "vocab_size", vocab_size);
  require_positive(where, "max_target_length", max_target_length);
  if (num_query_heads % num_kv_heads != 0)
    throw Error(where + ": num_query_heads (" + std::to_string(num_query_heads) +
                ") must be a multiple of num_kv_heads (" + std::to_string(num_kv_heads) + ")");
  if (head_dim % 2 != 0)
    throw Error(where + ": head_dim must be even for RoPE, got " + std::to_string(head_dim));
  if (!(normalization_layer_epsilon > 0))
    throw Error(where + ": normalization_layer_epsilon must be positive");
  if (!(rope_max_timescale > 0) || !(rope_min_timescale > 0))
    throw Error(where + ": rope timescales must be positive");
  if (!(query_scale > 0) || !std::isfinite(query_scale))
    throw Error(where + ": query_scale must be a positive finite number");
  if (final_logits_soft_cap < 0) throw Error(where + ": final_logits_soft_cap must be >= 0");
}

std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int /*layer*/) {
  const int64_t E = c.emb_dim, H = c.num_query_heads, K = c.num_kv_heads, D = c.head_dim,
                F = c.mlp_dim;
  std::vector<TensorSpec> specs = {
      {"pre_attn_norm", {E}},  {"attn.q", {E, H, D}},  {"attn.k", {E, K, D}},
      {"attn.v", {E, K, D}},   {"attn.o", {H, D, E}},  {"post_attn_norm", {E}},
      {"mlp.wi_0", {E, F}},    {"mlp.wi_1", {E, F}},   {"mlp.wo", {F, E}},
  };
  if (c.use_qk_norm) {
    specs.push_back({"attn.q_norm", {D}});
    specs.push_back({"attn.k_norm", {D}});
  }
  return specs;
}

std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c) {
  std::vector<TensorSpec> specs = {{"token_embedding", {c.vocab_size, c.emb_dim}},
                                   {"final_norm", {c.emb_dim}}};
  if (!c.logits_via_embedding) specs.push_back({"logits_dense", {c.emb_dim, c.vocab_size}});
  return specs;
}

}  // namespace kiln
