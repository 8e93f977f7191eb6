// `kiln export`: training checkpoint + config → artifact directory (docs/architecture.md §3).
//
// Stage order per layer: read → canonicalise names → unroll → merge LoRA (--merge-lora) →
// QK-Clip (so the clip applies to the merged weights) → convert to bf16 once → write. Run-time
// adapters (--lora-name) are written after the base as adapters/<name>/ (export/adapter.h).
// One tensor is held in f32 at a time (peak memory ≈ the largest layer tensor + a constant). The
// artifact is written to a locked temporary sibling directory, fsync'd and renamed into place only
// when complete (common/durable_output.h), so `out_dir` is always absent, the old or the new
// artifact. Equal inputs and options give byte-identical artifacts when SOURCE_DATE_EPOCH is set.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "export/qk_clip.h"
#include "schema/manifest.h"

namespace kiln {

// One --lora adapter directory.
struct LoraOption {
  std::string dir;
  std::string name;  // run-time adapter name (--lora-name); empty when merged
  double scale = 1;  // --lora-scale, multiplies the adapter's own alpha/r
};

struct ExportOptions {
  std::vector<std::string> checkpoints;
  std::string config_path;
  std::vector<std::pair<std::string, std::string>> overrides;  // --set key=value
  std::optional<int> scan_axis;                                // --scan-axis
  std::string out_dir;
  bool force = false;
  QkClipOptions qk_clip;  // threshold 0: off
  // LoRA adapters: all folded into the weights (merge_lora), or each written as a run-time
  // adapter under its name.
  std::vector<LoraOption> loras;
  bool merge_lora = false;
  // A SentencePiece model to embed in the manifest (`--tokenizer`); empty: none.
  std::string tokenizer_path;
  // How the matrices the engine multiplies by are stored: BA16a64b2a, the layout its kernels
  // read, so that the engine maps them in place instead of re-laying them at every start
  // (schema/tensor_layout.h; the default), or row-major, MaxText's order (`--weights-layout
  // row-major`: for tools that read the blobs' bytes themselves).
  TensorLayout weights_layout = TensorLayout::BA16a64b2a;
  // The command line as given, recorded in the manifest's provenance.
  std::vector<std::pair<std::string, std::string>> recorded_options;
};

struct ExportProgress {
  int64_t blobs_done = 0;
  int64_t blobs_total = 0;
  uint64_t bytes_written = 0;
  // While QK-Clip is calibrated (qk_clip.calibrator), before any blob of the artifact: the layers
  // whose gammas are final, of calibration_layers, and the export-and-measure passes so far.
  // calibration_layers is 0 once the artifact itself is written.
  int64_t calibrated_layers = 0;
  int64_t calibration_layers = 0;
  int calibration_passes = 0;
};

struct ExportSummary {
  int64_t layers = 0;
  uint64_t bytes_written = 0;
  std::string key_layout;
  bool scanned = false;
  double seconds = 0;
  QkClipRecord qk_clip;
  std::vector<AdapterRecord> adapters;
  int64_t tokenizer_pieces = 0;  // 0: no tokenizer embedded
};

// Checks that `out_dir` can be written (its parent exists; it does not, unless `force`) and
// returns it without a trailing '/'. Throws kiln::Error naming it.
std::string check_out_dir(const ExportOptions& opt);

// With qk_clip.calibrator, QK-Clip is calibrated first, sequentially: clipping layer l changes the
// input of every later layer, so statistics taken once on the unclipped model only bind the first
// clipped layer. Layer l is measured with layers 0..l-1 already clipped; one measurement serves
// every layer up to and including the next one that needs clipping, and only then is the model
// re-exported (to a scratch artifact in a locked hidden sibling of `out_dir`, removed at the end;
// a killed calibration's is removed by the next export to the same place).
//
// Throws kiln::Error (one line naming the file and key) on any bad input, a non-finite weight
// included; nothing is left at `out_dir` (or the previous artifact stays untouched) when it
// throws.
ExportSummary export_artifact(const ExportOptions& opt,
                              const std::function<void(const ExportProgress&)>& progress = {});

}  // namespace kiln
