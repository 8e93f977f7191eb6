// Size arithmetic on numbers read from files and arguments: a result that does not fit is
// refused, never wrapped. A crafted shape whose byte count wraps to a small number would otherwise
// pass every later bounds check.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

namespace kiln {

// The largest size kiln computes with: sizes are also used as int64_t, ptrdiff_t and off_t.
inline constexpr uint64_t kMaxSize = uint64_t(INT64_MAX);

// a × b, or nullopt when it exceeds kMaxSize.
constexpr std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r) || r > kMaxSize) return std::nullopt;
  return r;
}

// a + b, or nullopt when it exceeds kMaxSize.
constexpr std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r) || r > kMaxSize) return std::nullopt;
  return r;
}

// product(shape) × item_size, the bytes of a tensor; nullopt when a dimension is negative or a
// partial product exceeds kMaxSize (even if a later zero dimension would bring it back: code
// that walks the tensor computes those partial products as strides).
constexpr std::optional<uint64_t> checked_bytes(std::span<const int64_t> shape,
                                                uint64_t item_size) {
  std::optional<uint64_t> n = item_size <= kMaxSize ? std::optional<uint64_t>(1) : std::nullopt;
  for (const int64_t d : shape) {
    if (!n || d < 0) return std::nullopt;
    n = checked_mul(*n, uint64_t(d));
  }
  return n ? checked_mul(*n, item_size) : std::nullopt;
}

}  // namespace kiln
