// The model's hyper-parameters as the engine sees them; mirrors fb::ModelConfig in kiln.fbs.
// The exporter fills it from MaxText config files (export/config_reader.h) and the engine reads it
// back from the manifest; both go through to_fb / from_fb below.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

enum class RopeLayout : uint8_t { HalfSplit = 0, Interleaved = 1, Yarn = 2 };

struct ModelConfig {
  std::string decoder_block;  // llama2 | mistral | qwen3 | deepseek
  std::string model_name;
  int64_t emb_dim = 0;
  int64_t num_query_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t mlp_dim = 0;
  int64_t num_decoder_layers = 0;
  int64_t vocab_size = 0;
  double normalization_layer_epsilon = 1e-5;
  RopeLayout rope_layout = RopeLayout::HalfSplit;
  double rope_min_timescale = 1.0;
  double rope_max_timescale = 10000.0;
  double rope_linear_scaling_factor = 1.0;
  bool rope_use_scale = true;
  bool use_qk_norm = false;
  double query_scale = 1.0;
  bool logits_via_embedding = false;
  bool normalize_embedding_logits = true;
  double final_logits_soft_cap = 0.0;
  int64_t max_target_length = 2048;

  // DeepSeek family (decoder_block deepseek; docs/maxtext.md §1.7, §2.5, §2.7). Layers
  // [0, first_num_dense_layers) have a dense MLP, the rest MoE. MLA has num_kv_heads ==
  // num_query_heads; query_scale holds MLA's softmax scale (Dqk^-0.5 · mscale factor²).
  int64_t first_num_dense_layers = 0;
  int64_t q_lora_rank = 0;  // 0: a plain `query` projection (DeepSeek-V2-Lite)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_mlp_dim = 0;
  int64_t shared_experts = 0;
  double routed_scaling_factor = 1.0;
  std::string routed_score_func;  // "softmax" | "sigmoid" | "" (raw logits)
  bool routed_bias = false;
  // Weights of the selected experts come from the scores before the routing bias (DeepSeek-V3
  // noaux_tc). MaxText does this only for model names starting with deepseek3/deepseek4
  // (docs/maxtext.md §2.7); otherwise selection and weights both use the biased scores.
  bool routing_weights_pre_bias = false;
  int64_t n_routing_groups = -1;  // -1: no group-limited routing
  int64_t topk_routing_group = -1;
  // YaRN RoPE (rope_layout Yarn, docs/maxtext.md §2.3c); rope_max_timescale is θ.
  int64_t max_position_embeddings = 0;
  int64_t original_max_position_embeddings = 0;
  double rope_factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  bool rope_interleave = true;
  bool rope_truncate = true;

  bool is_deepseek() const { return decoder_block == "deepseek"; }
  bool is_moe_layer(int64_t layer) const {
    return is_deepseek() && layer >= first_num_dense_layers;
  }
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }

  // Throws kiln::Error("<where>: ...") naming the first inconsistent field (non-positive dims,
  // heads not divisible by kv heads, unsupported decoder_block, odd head_dim for RoPE, ...).
  void validate(const std::string& where) const;

 private:
  void validate_deepseek(const std::string& where) const;
};

// Canonical tensor names and their expected (unscanned) shapes for one layer / the globals.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int layer);
std::vector<TensorSpec> deepseek_layer_tensor_specs(const ModelConfig& c, int layer);
std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c);

}  // namespace kiln
