// Format constants of the kiln artifact (see kiln.fbs for the versioning rule).
#pragma once

#include <cstdint>

namespace kiln {

inline constexpr uint16_t kFormatMajor = 1;
// 1.1: DeepSeek config; 1.2: LoRA adapters; 1.3: manifest checksum trailer (schema/manifest.h)
inline constexpr uint16_t kFormatMinor = 3;
inline constexpr uint64_t kTensorAlignment = 64;

inline constexpr const char* kManifestFile = "manifest.kfb";
inline constexpr const char* kGlobalsFile = "globals.kblob";
inline constexpr const char* kAdaptersDir = "adapters";

}  // namespace kiln
