#include "schema/model_config.h"

#include <climits>
#include <cmath>
#include <type_traits>
#include <utility>

#include "common/checked.h"
#include "common/error.h"
#include "schema/blob_file.h"

namespace kiln {

namespace {

void require_positive(const std::string& where, const char* field, int64_t v) {
  if (v <= 0) throw Error(where + ": " + field + " must be positive, got " + std::to_string(v));
}

// Far beyond any real model, and small enough that sums and products of two dimensions (as the
// tensor shapes use them) cannot overflow; token ids are int32_t, so no vocabulary is larger.
constexpr int64_t kMaxDim = INT32_MAX;

// Every size derived from the config must be computable without wrapping: the bytes of each
// tensor in f32 (the exporter and the engine work in f32 too), of a sequence's attention cache
// and scores, and the QK-Clip record. A crafted vocabulary of 2^58 would otherwise wrap a blob's
// size to a small number that passes every later check.
void check_sizes(const ModelConfig& c, const std::string& where) {
  const std::pair<const char*, int64_t> dims[] = {
      {"emb_dim", c.emb_dim},
      {"num_query_heads", c.num_query_heads},
      {"num_kv_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"mlp_dim", c.mlp_dim},
      {"num_decoder_layers", c.num_decoder_layers},
      {"vocab_size", c.vocab_size},
      {"max_target_length", c.max_target_length},
      {"first_num_dense_layers", c.first_num_dense_layers},
      {"q_lora_rank", c.q_lora_rank},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"num_experts", c.num_experts},
      {"num_experts_per_tok", c.num_experts_per_tok},
      {"moe_mlp_dim", c.moe_mlp_dim},
      {"shared_experts", c.shared_experts},
  };
  for (const auto& [field, v] : dims)
    if (v > kMaxDim)
      throw Error(where + ": " + field + " " + std::to_string(v) + " is larger than " +
                  std::to_string(kMaxDim));

  auto require_fits = [&](const std::string& what, const std::vector<int64_t>& shape,
                          uint64_t item_size) {
    if (!checked_bytes(shape, item_size))
      throw Error(where + ": " + what + " of shape " + shape_to_string(shape) +
                  " is too large to address (" + std::to_string(item_size) +
                  "-byte values); the config's sizes are out of range");
  };
  // The first and the last layer cover both kinds of a DeepSeek model (dense, then MoE).
  for (const int64_t layer : {int64_t(0), c.num_decoder_layers - 1})
    for (const TensorSpec& t : layer_tensor_specs(c, int(layer)))
      require_fits("tensor '" + t.name + "'", t.shape, sizeof(float));
  for (const TensorSpec& t : global_tensor_specs(c))
    require_fits("tensor '" + t.name + "'", t.shape, sizeof(float));
  const int64_t cache_row = c.is_deepseek() ? c.kv_lora_rank + c.qk_rope_head_dim : c.head_dim;
  require_fits("a sequence's attention cache",
               std::vector<int64_t>{c.max_target_length, c.num_kv_heads, cache_row},
               2 * sizeof(uint16_t));
  require_fits("a sequence's attention scores",
               std::vector<int64_t>{c.max_target_length, c.num_query_heads}, sizeof(float));
  require_fits("the QK-Clip record", std::vector<int64_t>{c.num_decoder_layers, c.num_query_heads},
               sizeof(float));
}

}  // namespace

void ModelConfig::validate(const std::string& where) const {
  // A YAML `1e999` reads as infinity, and a damaged manifest can hold anything: every real-valued
  // hyper-parameter must be a number before the range checks below mean anything.
  visit_fields(*this, [&](const char* field, const auto& v, const auto&) {
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, double>)
      if (!std::isfinite(v))
        throw Error(where + ": " + field + " must be a finite number, got " + std::to_string(v));
  });
  if (decoder_block != "llama2" && decoder_block != "mistral" && decoder_block != "qwen3" &&
      decoder_block != "deepseek")
    throw Error(where + ": decoder_block '" + decoder_block +
                "' is not supported (expected llama2, mistral, qwen3 or deepseek)");
  if (is_deepseek()) {
    validate_deepseek(where);
    check_sizes(*this, where);
    return;
  }
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
  check_sizes(*this, where);
}

void ModelConfig::validate_deepseek(const std::string& where) const {
  require_positive(where, "emb_dim", emb_dim);
  require_positive(where, "num_query_heads", num_query_heads);
  require_positive(where, "num_decoder_layers", num_decoder_layers);
  require_positive(where, "vocab_size", vocab_size);
  require_positive(where, "max_target_length", max_target_length);
  require_positive(where, "kv_lora_rank", kv_lora_rank);
  require_positive(where, "qk_nope_head_dim", qk_nope_head_dim);
  require_positive(where, "qk_rope_head_dim", qk_rope_head_dim);
  require_positive(where, "v_head_dim", v_head_dim);
  if (num_kv_heads != num_query_heads)
    throw Error(where + ": MLA needs num_kv_heads == num_query_heads, got " +
                std::to_string(num_kv_heads) + " and " + std::to_string(num_query_heads));
  if (q_lora_rank < 0) throw Error(where + ": q_lora_rank must be >= 0");
  if (qk_rope_head_dim % 2 != 0)
    throw Error(where + ": qk_rope_head_dim must be even for RoPE, got " +
                std::to_string(qk_rope_head_dim));
  if (first_num_dense_layers < 0 || first_num_dense_layers > num_decoder_layers)
    throw Error(where + ": first_num_dense_layers must be in [0, num_decoder_layers]");
  if (first_num_dense_layers > 0) require_positive(where, "mlp_dim", mlp_dim);
  if (first_num_dense_layers < num_decoder_layers) {
    require_positive(where, "num_experts", num_experts);
    require_positive(where, "num_experts_per_tok", num_experts_per_tok);
    require_positive(where, "moe_mlp_dim", moe_mlp_dim);
    if (num_experts_per_tok > num_experts)
      throw Error(where + ": num_experts_per_tok exceeds num_experts");
    if (shared_experts < 0) throw Error(where + ": shared_experts must be >= 0");
    if (routed_score_func != "" && routed_score_func != "softmax" && routed_score_func != "sigmoid")
      throw Error(where + ": routed_score_func '" + routed_score_func +
                  "' is not supported (expected softmax, sigmoid or empty)");
    if (n_routing_groups != -1) {
      if (n_routing_groups <= 0 || num_experts % n_routing_groups != 0)
        throw Error(where + ": n_routing_groups must divide num_experts");
      if (topk_routing_group <= 0 || topk_routing_group > n_routing_groups)
        throw Error(where + ": topk_routing_group must be in [1, n_routing_groups]");
    }
  }
  if (rope_layout != RopeLayout::Yarn)
    throw Error(where + ": decoder_block deepseek needs rope_type yarn");
  require_positive(where, "original_max_position_embeddings", original_max_position_embeddings);
  if (!(rope_factor > 0) || !(rope_max_timescale > 0))
    throw Error(where + ": rope_factor and rope_max_timescale must be positive");
  if (!(query_scale > 0) || !std::isfinite(query_scale))
    throw Error(where + ": the MLA softmax scale must be a positive finite number");
}

std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int layer) {
  if (c.is_deepseek()) return deepseek_layer_tensor_specs(c, layer);
  const int64_t E = c.emb_dim, H = c.num_query_heads, K = c.num_kv_heads, D = c.head_dim,
                F = c.mlp_dim;
  std::vector<TensorSpec> specs = {
      {"pre_attn_norm", {E}}, {"attn.q", {E, H, D}}, {"attn.k", {E, K, D}},
      {"attn.v", {E, K, D}},  {"attn.o", {H, D, E}}, {"post_attn_norm", {E}},
      {"mlp.wi_0", {E, F}},   {"mlp.wi_1", {E, F}},  {"mlp.wo", {F, E}},
  };
  if (c.use_qk_norm) {
    specs.push_back({"attn.q_norm", {D}});
    specs.push_back({"attn.k_norm", {D}});
  }
  return specs;
}

std::vector<TensorSpec> deepseek_layer_tensor_specs(const ModelConfig& c, int layer) {
  const int64_t E = c.emb_dim, H = c.num_query_heads, Rq = c.q_lora_rank, Rkv = c.kv_lora_rank,
                Dn = c.qk_nope_head_dim, Dr = c.qk_rope_head_dim, Dv = c.v_head_dim;
  std::vector<TensorSpec> specs = {{"pre_attn_norm", {E}}};
  if (Rq > 0) {
    specs.push_back({"attn.wq_a", {E, Rq}});
    specs.push_back({"attn.q_a_norm", {Rq}});
    specs.push_back({"attn.wq_b", {Rq, H, Dn + Dr}});
  } else {
    specs.push_back({"attn.query", {E, H, Dn + Dr}});
  }
  specs.push_back({"attn.wkv_a", {E, Rkv + Dr}});
  specs.push_back({"attn.kv_a_norm", {Rkv}});
  specs.push_back({"attn.wkv_b", {Rkv, H, Dn + Dv}});
  specs.push_back({"attn.o", {H, Dv, E}});
  specs.push_back({"post_attn_norm", {E}});
  if (!c.is_moe_layer(layer)) {
    const int64_t F = c.mlp_dim;
    specs.push_back({"mlp.wi_0", {E, F}});
    specs.push_back({"mlp.wi_1", {E, F}});
    specs.push_back({"mlp.wo", {F, E}});
    return specs;
  }
  const int64_t X = c.num_experts, Fm = c.moe_mlp_dim, S = c.shared_experts * c.moe_mlp_dim;
  specs.push_back({"moe.gate", {E, X}});
  if (c.routed_bias) specs.push_back({"moe.gate_bias", {X}});
  specs.push_back({"moe.experts.wi_0", {X, E, Fm}});
  specs.push_back({"moe.experts.wi_1", {X, E, Fm}});
  specs.push_back({"moe.experts.wo", {X, Fm, E}});
  if (S > 0) {
    specs.push_back({"moe.shared.wi_0", {E, S}});
    specs.push_back({"moe.shared.wi_1", {E, S}});
    specs.push_back({"moe.shared.wo", {S, E}});
  }
  return specs;
}

std::optional<MatrixView> matrix_view(const ModelConfig& c, const TensorSpec& t) {
  const auto& s = t.shape;
  // K is the leading dim, or the leading two of an output projection [heads, head_dim, emb].
  static const char* const kLeadingK[] = {
      "attn.q",     "attn.k",          "attn.v",          "attn.wq_a",     "attn.wq_b",
      "attn.query", "attn.wkv_a",      "mlp.wi_0",        "mlp.wi_1",      "mlp.wo",
      "moe.gate",   "moe.shared.wi_0", "moe.shared.wi_1", "moe.shared.wo", "logits_dense"};
  for (const char* name : kLeadingK)
    if (t.name == name && s.size() >= 2) return MatrixView{s[0], 1};
  if (t.name == "attn.o" && s.size() == 3) return MatrixView{s[0] * s[1], 1};
  // The stacked experts [experts, K, N]: one matrix per expert.
  if (c.is_deepseek() && t.name.starts_with("moe.experts.") && s.size() == 3)
    return MatrixView{s[1], s[0]};
  return std::nullopt;  // norms, the embedding, MLA's wkv_b (read per head), biases
}

std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c) {
  std::vector<TensorSpec> specs = {{"token_embedding", {c.vocab_size, c.emb_dim}},
                                   {"final_norm", {c.emb_dim}}};
  if (!c.logits_via_embedding) specs.push_back({"logits_dense", {c.emb_dim, c.vocab_size}});
  return specs;
}

}  // namespace kiln
