// Format constants of the kiln artifact (see kiln.fbs for the versioning rule).
#pragma once

#include <cstdint>

namespace kiln {

inline constexpr uint16_t kFormatMajor = 1;
// A blob with a tensor in a layout other than row-major (kiln.fbs TensorLayout) says major 2, so
// that a reader that knows only row-major refuses it instead of misreading it. Readers of this
// version read both; the manifest stays major 1.
inline constexpr uint16_t kFormatMajorBlocked = 2;
// 1.1: DeepSeek config; 1.2: LoRA adapters; 1.3: manifest checksum trailer (schema/manifest.h);
// 1.4: tensor layouts (kiln.fbs Tensor.layout, matrix_k, matrix_batch)
inline constexpr uint16_t kFormatMinor = 4;
inline constexpr uint64_t kTensorAlignment = 64;

inline constexpr const char* kManifestFile = "manifest.kfb";
inline constexpr const char* kGlobalsFile = "globals.kblob";
inline constexpr const char* kAdaptersDir = "adapters";

}  // namespace kiln
