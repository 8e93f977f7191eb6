// Format constants of the kiln artifact (see kiln.fbs for the versioning rule).
#pragma once

#include <cstdint>

namespace kiln {

inline constexpr uint16_t kFormatMajor = 1;
inline constexpr uint16_t kFormatMinor = 1;  // 1.1: DeepSeek-family config fields
inline constexpr uint64_t kTensorAlignment = 64;

inline constexpr const char* kManifestFile = "manifest.kfb";
inline constexpr const char* kGlobalsFile = "globals.kblob";

}  // namespace kiln
