// LoRA adapters (docs/maxtext.md §4, issue 4): reading MaxText and PEFT adapter directories onto
// the artifact's canonical layer tensors, and the merge W' = W + s·A·B.
//
// Every adapter pair is presented flattened to two dimensions in MaxText's orientation:
//   A [in, r], B [r, out], with [in, out] the base kernel flattened (lora_in_out()),
// so that ΔW = s · A·B has the base kernel's layout ([in, out] row-major, the artifact layout).
//
// MaxText adapters (docs/maxtext.md §4.1): DIR/adapter_config.json {r, lora_alpha, target_modules}
// and one safetensors file of any name (or several with an *.index.json); leaves named literally
// `lora_a.kernel` / `lora_b.kernel`; Linen (`params.params.decoder…`) or NNX single-nested
// (`decoder…`); scanned (layer axis at index 1 of both A and B, groups `layers` or
// `dense_layers` / `moe_layers`, a group may be absent) or unrolled (`layers_N`). Target names
// q_proj/k_proj/v_proj/o_proj → self_attention.query/key/value/out; any other name is a module
// path (`mlp.wi_0`, `self_attention.wkv_b`), matched on whole path components. s = lora_alpha/r.
//
// PEFT adapters: DIR/adapter_config.json + DIR/adapter_model.safetensors with HF module names
// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in], `lora_B.weight`
// [out, r]); s = lora_alpha/r or, with use_rslora, lora_alpha/sqrt(r); rank_pattern and
// alpha_pattern per module. HF → MaxText (docs/maxtext.md §10.1/§10.2): A = lora_Aᵀ, B = lora_Bᵀ;
// Llama family: llama3.1 (interleaved RoPE) permutes the q and k output columns per head like the
// base converter, and llama2/mistral multiply B of q by 1/sqrt(head_dim) (the query scale the base
// converter folds into `query`); Qwen3 and DeepSeek: no transform. DoRA, modules_to_save, bias
// training, embedding/lm_head LoRA and other unsupported features are refused by name.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "schema/model_config.h"

namespace kiln {

enum class AdapterFormat { MaxText, Peft };
const char* adapter_format_name(AdapterFormat f);  // "maxtext" | "peft"

// Canonical layer tensors LoRA may target for this model (e.g. attn.q … mlp.wo for Llama;
// attn.wq_a, attn.wq_b or attn.query, attn.wkv_a, attn.wkv_b, attn.o and the dense-layer mlp.* for
// DeepSeek), in artifact order. `layer` matters for DeepSeek (MoE layers have no dense MLP).
std::vector<std::string> lora_target_tensors(const ModelConfig& c, int layer);

// How a canonical layer tensor flattens to [in, out] (attn.o [H, D, E] → in = H·D, out = E; every
// other kernel has one input axis). Throws kiln::Error for a tensor LoRA cannot target.
std::pair<int64_t, int64_t> lora_in_out(const ModelConfig& c, const std::string& tensor);

// One adapted tensor of one layer.
struct LoraTargetInfo {
  int layer = 0;
  std::string tensor;  // canonical, e.g. "attn.q"
  int64_t rank = 0;
  double scale = 0;  // effective: the adapter's alpha/r (or rsLoRA form) × the user's scale
  std::string a_key, b_key;  // the stored keys (for messages)
};

// A LoRA pair in f32, flattened and transformed as described at the top: A [in, r], B [r, out].
struct LoraDelta {
  int64_t in = 0, out = 0, rank = 0;
  float scale = 0;
  std::vector<float> a, b;
};

class AdapterSource {
 public:
  // Reads DIR/adapter_config.json and the weights (mmapped), and checks every tensor against the
  // base config `base` before anything is read: names, A/B rank agreement, shapes, layer count,
  // targets. `user_scale` multiplies every pair's scale (--lora-scale). Throws kiln::Error with one
  // line naming the file and the tensor (or config key) on any problem.
  static AdapterSource open(const std::string& dir, const ModelConfig& base, double user_scale = 1);

  AdapterSource(AdapterSource&&) noexcept;
  AdapterSource& operator=(AdapterSource&&) noexcept;
  ~AdapterSource();

  AdapterFormat format() const;
  const std::string& dir() const;
  int64_t rank() const;  // `r` of the config
  double lora_alpha() const;
  bool use_rslora() const;
  double user_scale() const;
  // Every adapted (layer, tensor), sorted by layer, then in lora_target_tensors() order.
  const std::vector<LoraTargetInfo>& targets() const;
  // nullptr when this adapter does not touch (layer, tensor).
  const LoraTargetInfo* find(int layer, const std::string& tensor) const;
  // The pair for (layer, tensor) (must be in targets()), unrolled and transformed.
  LoraDelta read(int layer, const std::string& tensor) const;

 private:
  struct Impl;
  explicit AdapterSource(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// w[in, out] += scale · A·B, accumulated in f32 (the export-time merge; the caller rounds once).
void merge_lora(const LoraDelta& d, float* w);

}  // namespace kiln
