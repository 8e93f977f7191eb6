// The model's hyper-parameters as the engine sees them; mirrors fb::ModelConfig in kiln.fbs.
// The exporter fills it from MaxText config files (export/config_reader.h) and the engine reads it
// back from the manifest; both go through to_fb / from_fb below.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

enum class RopeLayout : uint8_t { HalfSplit = 0, Interleaved = 1 };

struct ModelConfig {
  std::string decoder_block;  // llama2 | mistral | qwen3
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

  // Throws kiln::Error("<where>: ...") naming the first inconsistent field (non-positive dims,
  // heads not divisible by kv heads, unsupported decoder_block, odd head_dim for RoPE, ...).
  void validate(const std::string& where) const;
};

// Canonical tensor names and their expected (unscanned) shapes for one layer / the globals.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> layer_tensor_specs(const ModelConfig& c, int layer);
std::vector<TensorSpec> global_tensor_specs(const ModelConfig& c);

}  // namespace kiln
