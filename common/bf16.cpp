#include "common/bf16.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <xsimd/xsimd.hpp>

namespace kiln {

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  return std::bit_cast<float>(bits);
}

NonFiniteCounts convert_f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  using batch = xsimd::batch<uint32_t>;
  constexpr size_t W = batch::size;
  NonFiniteCounts counts;
  size_t i = 0;
  const batch exp_mask(0x7f800000u), abs_mask(0x7fffffffu), one(1u), bias(0x7fffu);
  for (; i + W <= n; i += W) {
    batch u = batch::load_unaligned(reinterpret_cast<const uint32_t*>(src + i));
    batch a = u & abs_mask;
    auto nonfinite = (a & exp_mask) == exp_mask;
    if (xsimd::any(nonfinite)) {
      for (size_t j = 0; j < W; ++j) {  // rare: count and convert this vector one by one
        float f = src[i + j];
        if (std::isnan(f)) ++counts.nan;
        if (std::isinf(f)) ++counts.inf;
        dst[i + j] = f32_to_bf16(f);
      }
      continue;
    }
    batch r = (u + bias + ((u >> 16) & one)) >> 16;
    alignas(64) uint32_t tmp[W];
    r.store_aligned(tmp);
    for (size_t j = 0; j < W; ++j) dst[i + j] = uint16_t(tmp[j]);
  }
  for (; i < n; ++i) {
    float f = src[i];
    if (std::isnan(f)) ++counts.nan;
    if (std::isinf(f)) ++counts.inf;
    dst[i] = f32_to_bf16(f);
  }
  return counts;
}

void convert_bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void convert_f16_to_f32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

void round_to_bf16_inplace(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = round_to_bf16(x[i]);
}

namespace {

template <typename T>
T load_unaligned(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

// A file mapping gives no alignment guarantee (a safetensors header length is arbitrary), so
// 16-bit inputs that are not 2-byte aligned are staged through an aligned buffer rather than
// reinterpreted in place.
void convert_to_f32(DType dt, const uint8_t* src, size_t n, float* out) {
  if (n == 0) return;  // a tensor of no elements may have no buffer at all (memcpy of nullptr)
  if (dt == DType::F32) {
    std::memcpy(out, src, n * sizeof(float));
    return;
  }
  auto bulk = dt == DType::BF16 ? convert_bf16_to_f32 : convert_f16_to_f32;
  if (reinterpret_cast<uintptr_t>(src) % alignof(uint16_t) == 0) {
    bulk(reinterpret_cast<const uint16_t*>(src), out, n);
    return;
  }
  constexpr size_t kChunk = 4096;
  uint16_t buf[kChunk];
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t m = std::min(kChunk, n - i);
    std::memcpy(buf, src + i * 2, m * 2);
    bulk(buf, out + i, m);
  }
}

float to_f32(DType dt, const uint8_t* p) {
  switch (dt) {
    case DType::F32:
      return load_unaligned<float>(p);
    case DType::BF16:
      return bf16_to_f32(load_unaligned<uint16_t>(p));
    case DType::F16:
      return f16_to_f32(load_unaligned<uint16_t>(p));
  }
  return 0.0f;
}

}  // namespace kiln
