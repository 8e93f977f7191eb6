// Unrolling a scanned layer group: MaxText stacks every parameter of a decoder layer group on one
// axis (`param_scan_axis`, default 1; docs/maxtext.md §1.2: insert L at that position of the
// unscanned shape). Layer l of a scanned tensor is its slice at index l of that axis.
// Already-unrolled checkpoints (`layers_0 … layers_{L-1}`) are read as they are.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "export/safetensors.h"

namespace kiln {

// The shape a scanned tensor has on disk for an unscanned `shape`, `num_layers` layers stacked
// at `scan_axis`. Throws kiln::Error naming `key` if the axis is out of range for the tensor.
std::vector<int64_t> scanned_shape(const std::vector<int64_t>& shape, int64_t num_layers,
                                   int scan_axis, const std::string& key);

// One parameter of one layer: which stored tensor holds it and how to take the layer out.
struct LayerTensorSource {
  const SourceTensor* tensor = nullptr;
  int scan_axis = -1;  // -1: not scanned, the whole tensor is the layer's
  int64_t index = 0;   // layer index along scan_axis
};

// Reads the layer's slice as f32 into `out` (numel of the unscanned shape).
void unroll_scanned_layer(const LayerTensorSource& src, float* out);

// Maps canonical checkpoint keys (export/key_layout.h) of one layer group onto layers.
// `group` is the group's name under `decoder/` ("layers"). Scanned form: `decoder/<group>/<param>`;
// unrolled form: `decoder/<group>_<i>/<param>`. A checkpoint holding both forms is refused.
class LayerGroup {
 public:
  LayerGroup(const std::map<std::string, const SourceTensor*>& canonical, std::string group,
             int scan_axis);

  bool scanned() const { return scanned_; }
  // The canonical key that holds `param` of `layer` (for messages and for consumption tracking).
  std::string key_for(int64_t layer, const std::string& param) const;
  // nullptr tensor if absent.
  LayerTensorSource find(int64_t layer, const std::string& param) const;
  // True if `canonical_key` belongs to this group (either form); sets layer (or -1 if scanned)
  // and the param part.
  bool owns(const std::string& canonical_key, int64_t* layer, std::string* param) const;

 private:
  const std::map<std::string, const SourceTensor*>& canonical_;
  std::string group_;
  int scan_axis_;
  bool scanned_ = false;
};

}  // namespace kiln
