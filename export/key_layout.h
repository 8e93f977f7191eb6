// Recognising MaxText parameter key layouts and mapping keys onto canonical paths.
//
// Canonical path: the MaxText module path with components joined by '/', without the container
// prefix (`params/params/`, `model/`, `base/`) or the NNX `value` leaf, e.g.
// clang-format off
//   params.params.decoder.layers.self_attention.query.kernel  →  decoder/layers/self_attention/query/kernel
//   model/decoder/layers_3/mlp/wo/kernel/value                →  decoder/layers_3/mlp/wo/kernel
//   decoder.decoder_norm.scale.value                          →  decoder/decoder_norm/scale
// clang-format on
// Separators '/' and '.' are both accepted. LoRA leaf names contain a literal dot ("lora_a.kernel",
// "lora_b.kernel") and stay one component.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "schema/model_config.h"

namespace kiln {

enum class KeyLayout { MaxTextLinen, MaxTextNnx };

std::string_view key_layout_name(KeyLayout l);  // "maxtext-linen" | "maxtext-nnx"

// Splits a raw key into components (see above).
std::vector<std::string> split_key(std::string_view raw);

// Decides the layout from all keys of a checkpoint. Throws kiln::Error naming `where` if the keys
// mix layouts or match none (listing a few offending keys).
KeyLayout detect_key_layout(const std::vector<std::string>& raw_keys, const std::string& where);

// The canonical path of a raw key, or std::nullopt for keys that are not model parameters
// (optimizer state `opt_state…`, `step`, `nnx_aux…`), which the exporter skips.
std::optional<std::string> canonical_key(std::string_view raw, KeyLayout layout);

// N of an unrolled layer's key component `GROUP_N` (`layers_12` for group "layers"), or
// std::nullopt when `component` is not GROUP_ followed by a decimal number that fits in 64 bits
// (`layers_99999999999999999999` is no layer of the group).
std::optional<int64_t> unrolled_layer_index(std::string_view component, std::string_view group);

// A layer group of the decoder and the global layers it holds (docs/maxtext.md §1.2, §1.7):
// Llama-family models have one group `layers`; DeepSeek has `dense_layers` then `moe_layers`,
// numbered globally with the dense ones first. A group may be empty (count 0).
struct GroupSpan {
  std::string name;
  int64_t first_layer = 0;
  int64_t count = 0;
};
std::vector<GroupSpan> layer_groups(const ModelConfig& c);

}  // namespace kiln
