// Element types that appear in inputs and artifacts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kiln {

enum class DType : uint8_t { F32 = 0, BF16 = 1, F16 = 2 };

constexpr size_t dtype_size(DType t) {
  return t == DType::F32 ? 4 : 2;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "f16";
  }
  return "?";
}

}  // namespace kiln
