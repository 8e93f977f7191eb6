#include "common/crc32c.h"

#include <nmmintrin.h>

#include <cstring>

namespace kiln {

// Built with -msse4.2 for this file only; every x86-64 CPU kiln targets (AVX-512) has it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  // One stream at 8 bytes per 3 cycles (~13 GB/s) is far faster than the disk; no need for the
  // interleaved three-stream variant.
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = uint32_t(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

}  // namespace kiln
