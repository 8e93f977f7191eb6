// bf16 / f16 conversions. f32 → bf16 rounds to nearest, ties to even; NaN stays NaN (quiet);
// ±Inf stays ±Inf; values that round past the largest bf16 become ±Inf, as in every ML framework.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace kiln {

inline float bf16_to_f32(uint16_t b) {
  return std::bit_cast<float>(uint32_t(b) << 16);
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Rounds f to the nearest bf16 value and returns it as f32 (used to mirror MaxText's bf16
// rounding points while computing in f32).
inline float round_to_bf16(float f) {
  return bf16_to_f32(f32_to_bf16(f));
}

float f16_to_f32(uint16_t h);

// How many non-finite values a conversion saw (reported by the exporter, never silently dropped).
struct NonFiniteCounts {
  uint64_t nan = 0;
  uint64_t inf = 0;
  NonFiniteCounts& operator+=(const NonFiniteCounts& o) {
    nan += o.nan;
    inf += o.inf;
    return *this;
  }
};

// Bulk conversions (SIMD). Each returns the number of NaN/Inf in its input.
NonFiniteCounts convert_f32_to_bf16(const float* src, uint16_t* dst, size_t n);
void convert_bf16_to_f32(const uint16_t* src, float* dst, size_t n);
void convert_f16_to_f32(const uint16_t* src, float* dst, size_t n);
// n f32, bf16 or f16 values at src (of any alignment, e.g. inside a mapped file) as f32 into
// out; to_f32 one value.
void convert_to_f32(DType dt, const uint8_t* src, size_t n, float* out);
float to_f32(DType dt, const uint8_t* src);
// In place: rounds every value of x to bf16 precision.
void round_to_bf16_inplace(float* x, size_t n);

}  // namespace kiln
