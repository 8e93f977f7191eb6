// The model's hyper-parameters as the engine sees them; mirrors fb::ModelConfig in kiln.fbs.
// The exporter fills it from MaxText config files (export/config_reader.h) and the engine reads it
// back from the manifest (schema/manifest.cpp). visit_fields() at the end is the one list of the
// fields that the manifest writer and reader, the config reader and `kiln inspect` go through:
// adding a field means adding it to kiln.fbs, to the struct and to that list.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "schema/tensor_layout.h"

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

// Which decoder blocks a field means something for. `kiln inspect` shows a field only for its
// family; the exporter reads a DeepSeek field's key only for decoder_block deepseek (the other
// blocks keep the struct's default), every other field's key for every block.
enum class FieldFamily : uint8_t { All, Llama, DeepSeek };  // Llama: llama2, mistral, qwen3

// How the exporter gets a field from a MaxText config (export/config_reader.cpp).
enum class FieldSource : uint8_t {
  Optional,       // the key, or FieldMeta::maxtext when absent
  Required,       // the key must be given
  RequiredLlama,  // required for llama2/mistral/qwen3; optional for DeepSeek (MLA derives it)
  RequiredMoe,    // required when the model has MoE layers; optional otherwise
  DenseDim,       // a size of the dense-MLP layers: required when there are some, else 0
  MoeDim,         // a size of the MoE layers: required when there are some, else 0
  Derived,        // not a key: the exporter computes it from other keys
};

template <class T>
struct FieldMeta {
  FieldFamily family = FieldFamily::All;
  FieldSource source = FieldSource::Optional;
  T maxtext{};             // MaxText base.yml's value, for an Optional key that is absent
  bool base_name = false;  // also read as `base_<name>`, MaxText's unscaled dimension names
};

// Calls v(name, field, FieldMeta<T>) for every field, in kiln.fbs's order (the manifest writer
// addresses FlatBuffers fields by this position; tests/unit/model_config_test.cpp checks names,
// order and types against the generated schema). `Config` is ModelConfig or const ModelConfig.
template <class Config, class Visitor>
void visit_fields(Config& c, Visitor&& v) {
  // The meta's type follows the field's, so that a default cannot be given in the wrong type.
  auto field = [&v]<class T>(const char* name, T& value, FieldMeta<std::remove_const_t<T>> meta) {
    v(name, value, meta);
  };
  using F = FieldFamily;
  using S = FieldSource;
  // The name is the member's: a field cannot be listed under another field's name.
#define KILN_FIELD(member, ...) field(#member, c.member, {__VA_ARGS__})
  KILN_FIELD(decoder_block, .source = S::Required);
  KILN_FIELD(model_name);  // absent: a YAML file's stem (config_reader.cpp)
  KILN_FIELD(emb_dim, .source = S::Required, .base_name = true);
  KILN_FIELD(num_query_heads, .source = S::Required, .base_name = true);
  KILN_FIELD(num_kv_heads, .source = S::RequiredLlama, .base_name = true);
  KILN_FIELD(head_dim, .family = F::Llama, .maxtext = 128);
  KILN_FIELD(mlp_dim, .source = S::DenseDim, .base_name = true);
  KILN_FIELD(num_decoder_layers, .source = S::Required, .base_name = true);
  KILN_FIELD(vocab_size, .source = S::Required);
  KILN_FIELD(normalization_layer_epsilon, .maxtext = 1e-5);
  KILN_FIELD(rope_layout, .source = S::Derived);
  KILN_FIELD(rope_min_timescale, .family = F::Llama, .maxtext = 1.0);
  KILN_FIELD(rope_max_timescale, .maxtext = 10000.0);
  KILN_FIELD(rope_linear_scaling_factor, .family = F::Llama, .maxtext = 1.0);
  KILN_FIELD(rope_use_scale, .family = F::Llama, .maxtext = true);
  KILN_FIELD(use_qk_norm, .family = F::Llama, .maxtext = false);  // qwen3: true
  KILN_FIELD(query_scale, .source = S::Derived);
  KILN_FIELD(logits_via_embedding, .maxtext = false);
  KILN_FIELD(normalize_embedding_logits, .maxtext = true);
  KILN_FIELD(final_logits_soft_cap, .maxtext = 0.0);
  KILN_FIELD(max_target_length, .maxtext = 2048);
  KILN_FIELD(first_num_dense_layers, .family = F::DeepSeek, .maxtext = 0);
  KILN_FIELD(q_lora_rank, .family = F::DeepSeek, .maxtext = 0);
  KILN_FIELD(kv_lora_rank, .family = F::DeepSeek, .source = S::Required);
  KILN_FIELD(qk_nope_head_dim, .family = F::DeepSeek, .source = S::Required);
  KILN_FIELD(qk_rope_head_dim, .family = F::DeepSeek, .source = S::Required);
  KILN_FIELD(v_head_dim, .family = F::DeepSeek, .source = S::Required);
  KILN_FIELD(num_experts, .family = F::DeepSeek, .source = S::RequiredMoe);
  KILN_FIELD(num_experts_per_tok, .family = F::DeepSeek, .source = S::RequiredMoe);
  KILN_FIELD(moe_mlp_dim, .family = F::DeepSeek, .source = S::MoeDim, .base_name = true);
  KILN_FIELD(shared_experts, .family = F::DeepSeek, .maxtext = 1);
  KILN_FIELD(routed_scaling_factor, .family = F::DeepSeek, .maxtext = 1.0);
  KILN_FIELD(routed_score_func, .family = F::DeepSeek);
  KILN_FIELD(routed_bias, .family = F::DeepSeek, .maxtext = false);
  KILN_FIELD(routing_weights_pre_bias, .family = F::DeepSeek, .source = S::Derived);
  KILN_FIELD(n_routing_groups, .family = F::DeepSeek, .maxtext = -1);
  KILN_FIELD(topk_routing_group, .family = F::DeepSeek, .maxtext = -1);
  KILN_FIELD(max_position_embeddings, .family = F::DeepSeek, .maxtext = 163840);
  KILN_FIELD(original_max_position_embeddings, .family = F::DeepSeek, .maxtext = 4096);
  KILN_FIELD(rope_factor, .family = F::DeepSeek, .maxtext = 40.0);
  KILN_FIELD(beta_fast, .family = F::DeepSeek, .maxtext = 32.0);
  KILN_FIELD(beta_slow, .family = F::DeepSeek, .maxtext = 1.0);
  KILN_FIELD(mscale, .family = F::DeepSeek, .maxtext = 1.0);
  KILN_FIELD(rope_interleave, .family = F::DeepSeek, .maxtext = true);
  KILN_FIELD(rope_truncate, .family = F::DeepSeek, .maxtext = true);
#undef KILN_FIELD
}

// Canonical tensor names and their expected (unscanned) shapes for one layer / the globals.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  // How the writer stores it (schema/tensor_layout.h); matrix_k / matrix_batch for BA16a64b2a.
  TensorLayout layout = TensorLayout::RowMajor;
  int64_t matrix_k = 0, matrix_batch = 1;
};
std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int layer);
std::vector<TensorSpec> deepseek_layer_tensor_specs(const ModelConfig& c, int layer);
std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c);
// The tensors the engine multiplies by through its matrix kernels, as `batch` stacked matrices of
// K rows: the ones `kiln export --weights-layout blocked` stores in BA16a64b2a (the engine's
// families view them the same way). nullopt for the others.
struct MatrixView {
  int64_t K = 0, batch = 1;
};
std::optional<MatrixView> matrix_view(const ModelConfig& c, const TensorSpec& t);

}  // namespace kiln
