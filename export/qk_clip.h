// QK-Clip (MuonClip's per-head rescale of query/key weights, docs/maxtext.md §3), baked in at
// export.
//
// Statistics: per-head max pre-softmax logits recorded during training (MaxText intermediates
// `…/self_attention/attention_op/max_logits` or `…/self_attention/max_logits`, Linen sow tuples
// ending in `/0`), stacked for a scanned group (layer axis first) or one key per unrolled layer.
// gamma_h = min(1, tau / (S_h + 1e-6)). MLA: wq_b (or `query` when q_lora_rank = 0) nope columns
// × sqrt(gamma), rope columns × gamma; wkv_b k_nope columns × sqrt(gamma), values untouched.
// Query mode (any attention): each query head × gamma. Applied in f32 before the single rounding
// to bf16; heads with gamma = 1 and layers without statistics are left bit-identical.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "schema/manifest.h"
#include "schema/model_config.h"

namespace kiln {

// Measures the per-head max logits of an exported artifact, for the sequential calibrate-and-clip
// of `kiln export --qk-clip-calibrate` (export_artifact). The engine does the measuring; it sits
// above export/, so the caller injects it through this interface (tools/kiln/common.h).
class MaxLogitCalibrator {
 public:
  virtual ~MaxLogitCalibrator() = default;
  // Per layer and query head ([layers, heads] row-major), the largest pre-softmax logit of the
  // artifact at `artifact_dir` on the calibration prompts.
  virtual std::vector<float> max_logits(const std::string& artifact_dir) = 0;
  // What the statistics are measured on (the prompts file), recorded in the manifest.
  virtual std::string source() const = 0;
};

struct QkClipOptions {
  double threshold = 0;            // tau; 0 = QK-Clip off
  std::vector<std::string> stats;  // --max-logits files (safetensors)
  bool per_group = false;          // one gamma per head for a whole scanned group, as MaxText
  std::string mode = "mla";        // "mla" | "query"
  // --qk-clip-calibrate: instead of `stats`, measure while exporting, layer l with layers 0..l-1
  // already clipped (per layer only). Not owned.
  MaxLogitCalibrator* calibrator = nullptr;
};

// Per global layer, per head, the max logit S (NaN where a layer has no statistics).
struct MaxLogits {
  int64_t layers = 0;
  int64_t heads = 0;
  std::vector<float> s;  // [layers, heads]
  std::vector<std::string> sources;
};

// Reads and reduces the statistics. Throws kiln::Error naming the file and key for a head count
// that differs from the config, a stacked layer count that differs from the group, a layer index
// outside the model, a dtype other than f32/bf16/f16, or a file without any max-logit key.
MaxLogits read_max_logits(const QkClipOptions& opt, const ModelConfig& c);

// A head's gamma for max logit `s`: tau / (s + 1e-6) above tau, exactly 1 at or below it and
// without statistics (NaN).
float qk_clip_gamma(float s, float tau);

// Computes the record (gamma per layer and head) from the statistics. Throws for an MLA mode on
// a non-MLA model (unless mode is "query") and for a non-positive threshold.
QkClipRecord plan_qk_clip(const QkClipOptions& opt, const ModelConfig& c, const MaxLogits& stats);

// Rescales `w` (f32, the unscanned shape of canonical tensor `name` in layer `layer`) in place
// if QK-Clip touches that tensor. Returns whether it changed anything.
bool apply_qk_clip(const QkClipRecord& rec, const ModelConfig& c, int64_t layer,
                   const std::string& name, float* w);

// The same column scaling on the B factor [rank, out] of a LoRA pair on tensor `name`. QK-Clip
// scales output columns only, so clip(W + s·A·B) = clip(W) + s·A·clip(B): a run-time adapter of a
// clipped artifact with B scaled this way computes exactly what merging and then clipping would.
bool apply_qk_clip_to_lora_b(const QkClipRecord& rec, const ModelConfig& c, int64_t layer,
                             const std::string& name, float* b, int64_t rank);

}  // namespace kiln
