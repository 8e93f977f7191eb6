// Reading the model configuration: a JSON object or a MaxText model YAML file (flat `key: value`
// lines, `base_*` dimension names, numbers like `500_000` or `1e-5`, `[a, b]` lists, comments),
// plus `--set key=value` overrides. MaxText base.yml defaults are applied explicitly here (never
// in the engine) and derived fields (RoPE layout, query scale, q/k norm) are resolved here.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "schema/model_config.h"

namespace kiln {

struct ExportConfig {
  ModelConfig model;
  bool scan_layers = true;  // MaxText `scan_layers`
  int param_scan_axis = 1;  // MaxText `param_scan_axis`
  // Every key/value as read (after overrides), kept for provenance.
  std::vector<std::pair<std::string, std::string>> raw;
};

// Throws kiln::Error naming the file (and line/key) for unreadable files, malformed JSON/YAML,
// values of the wrong type, and — in one message — every missing required field.
ExportConfig read_export_config(const std::string& path,
                                const std::vector<std::pair<std::string, std::string>>& overrides);

}  // namespace kiln
