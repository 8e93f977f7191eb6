// The model configuration (`kiln export --config FILE`): the input is the whole file, read as
// JSON or as a MaxText YAML by its name, as kiln decides. Shared by fuzz_config_json.cpp and
// fuzz_config_yaml.cpp, which differ in the name and so in their seeds and their parser.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "export/config_reader.h"
#include "tests/fuzz/fuzz_common.h"

namespace kiln::fuzz {

inline int read_config_file(const std::string& name, const uint8_t* data, size_t size) {
  try {
    const ExportConfig cfg = read_export_config(write_scratch_file(name, {data, size}), {});
    // What the exporter derives from an accepted config first: the tensor shapes it expects.
    global_tensor_specs(cfg.model);
    const int64_t layers = cfg.model.num_decoder_layers;
    for (int64_t l : {int64_t(0), layers - 1})
      if (l >= 0) layer_tensor_specs(cfg.model, int(std::min<int64_t>(l, INT32_MAX)));
  } catch (const Error& e) {
    refused(e);
  }
  return 0;
}

}  // namespace kiln::fuzz
