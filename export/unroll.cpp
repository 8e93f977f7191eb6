#include "export/unroll.h"

#include <optional>
#include <string_view>

#include "common/error.h"
#include "export/key_layout.h"
#include "schema/blob_file.h"

namespace kiln {

std::vector<int64_t> scanned_shape(const std::vector<int64_t>& shape, int64_t num_layers,
                                   int scan_axis, const std::string& key) {
  if (scan_axis < 0 || size_t(scan_axis) > shape.size())
    throw Error("scan axis " + std::to_string(scan_axis) + " is out of range for '" + key +
                "' (unscanned rank " + std::to_string(shape.size()) + ", expected 0.." +
                std::to_string(shape.size()) + ")");
  std::vector<int64_t> s = shape;
  s.insert(s.begin() + scan_axis, num_layers);
  return s;
}

void unroll_scanned_layer(const LayerTensorSource& src, float* out) {
  if (src.scan_axis < 0)
    read_as_f32(*src.tensor, out);
  else
    read_slice_as_f32(*src.tensor, src.scan_axis, src.index, out);
}

LayerGroup::LayerGroup(const std::map<std::string, const SourceTensor*>& canonical,
                       std::string group, int scan_axis)
    : canonical_(canonical), group_(std::move(group)), scan_axis_(scan_axis) {
  const std::string scanned_prefix = "decoder/" + group_ + "/";
  const std::string unrolled_prefix = "decoder/" + group_ + "_";
  std::string a_scanned, a_unrolled;
  for (const auto& [key, t] : canonical_) {
    if (key.rfind(scanned_prefix, 0) == 0 && a_scanned.empty()) a_scanned = t->key;
    if (key.rfind(unrolled_prefix, 0) == 0 && a_unrolled.empty()) a_unrolled = t->key;
  }
  if (!a_scanned.empty() && !a_unrolled.empty())
    throw Error("checkpoint mixes a scanned '" + group_ + "' group ('" + a_scanned +
                "') with unrolled layers ('" + a_unrolled + "'); expected one form");
  scanned_ = !a_scanned.empty();
}

std::string LayerGroup::key_for(int64_t layer, const std::string& param) const {
  return scanned_ ? "decoder/" + group_ + "/" + param
                  : "decoder/" + group_ + "_" + std::to_string(layer) + "/" + param;
}

LayerTensorSource LayerGroup::find(int64_t layer, const std::string& param) const {
  auto it = canonical_.find(key_for(layer, param));
  if (it == canonical_.end()) return {};
  return {it->second, scanned_ ? scan_axis_ : -1, scanned_ ? layer : 0};
}

bool LayerGroup::owns(const std::string& key, int64_t* layer, std::string* param) const {
  const std::string scanned_prefix = "decoder/" + group_ + "/";
  if (key.rfind(scanned_prefix, 0) == 0) {
    *layer = -1;
    *param = key.substr(scanned_prefix.size());
    return true;
  }
  constexpr std::string_view kDecoder = "decoder/";
  if (!key.starts_with(kDecoder)) return false;
  const size_t slash = key.find('/', kDecoder.size());
  const std::optional<int64_t> index = unrolled_layer_index(
      std::string_view(key).substr(kDecoder.size(), slash - kDecoder.size()), group_);
  if (!index) return false;
  *layer = *index;
  *param = slash == std::string::npos ? "" : key.substr(slash + 1);
  return true;
}

}  // namespace kiln
