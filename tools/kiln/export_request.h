// The export options as a user gives them, shared by `kiln export` and the Python package's
// kiln.export: one place that refuses the combinations that make no sense and records the options
// in the manifest's provenance, in the CLI's spelling whichever front end gave them (so an
// artifact says the same thing about its making either way).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "export/exporter.h"
#include "tools/kiln/common.h"

namespace kiln::cli {

struct ExportRequest {
  std::vector<std::string> checkpoints;
  std::string config;
  std::vector<std::string> set;  // KEY=VALUE config overrides
  std::optional<int> scan_axis;
  std::string out;
  std::vector<std::string> max_logits;
  std::optional<double> qk_clip_threshold;
  bool qk_clip_per_group = false;
  std::optional<std::string> qk_clip_mode;       // unset: "mla"
  std::optional<std::string> qk_clip_calibrate;  // a prompts file
  std::vector<std::string> lora;
  std::vector<std::string> lora_name;
  std::optional<double> lora_scale;  // unset: 1
  bool merge_lora = false;
  std::optional<std::string> tokenizer;
  std::optional<std::string> weights_layout;  // "blocked" (default) or "row-major"
  bool force = false;
};

// How a front end names the options in its messages: `--merge-lora` or `merge_lora`.
enum class OptionSpelling { Cli, Python };

// ExportOptions ready for export_artifact, with the QK-Clip calibrator they point to (held here,
// so the pair moves together).
struct PreparedExport {
  ExportOptions options;
  std::unique_ptr<PromptsCalibrator> calibrator;
};

// Checks the combinations (one --lora-name per --lora unless --merge-lora, calibration without
// statistics and with a threshold, ...) and builds the options. A refused combination throws
// refuse(message), a UsageError in the front end's format, naming the options as `spelling` does.
PreparedExport prepare_export(const ExportRequest& request, OptionSpelling spelling,
                              const std::function<UsageError(const std::string&)>& refuse);

}  // namespace kiln::cli
