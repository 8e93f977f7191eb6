#include "common/crc32c.h"

#include <nmmintrin.h>

#include <array>
#include <cstring>

namespace kiln {

namespace {

// Polynomials over GF(2) modulo the reflected Castagnoli polynomial, bit 31 holding x^0.
constexpr uint32_t kPoly = 0x82f63b78u;

constexpr uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(2^k) mod p for k < 67: the bits of a 64-bit byte count, times 8.
constexpr std::array<uint32_t, 67> make_x2n_table() {
  std::array<uint32_t, 67> t{};
  uint32_t p = 1u << 30;  // x^1
  t[0] = p;
  for (size_t k = 1; k < t.size(); ++k) t[k] = p = multmodp(p, p);
  return t;
}
constexpr std::array<uint32_t, 67> kX2n = make_x2n_table();

// x^(8·len) mod p: multiplying a CRC by it appends len zero bytes' worth of shift.
constexpr uint32_t shift_for(uint64_t len) {
  uint32_t shift = 1u << 31;  // x^0
  for (unsigned k = 3; len; len >>= 1, ++k)
    if (len & 1) shift = multmodp(kX2n[k], shift);
  return shift;
}

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Each block is three streams of this many bytes.
constexpr size_t kStride = size_t(32) << 10;
constexpr uint32_t kStrideShift = shift_for(kStride);

}  // namespace

// Built with -msse4.2 for this file only; every x86-64 CPU kiln targets (AVX-512) has it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  // crc32 has a latency of 3 cycles and a throughput of one per cycle: one stream runs at a third
  // of the unit's speed (measured 4.4 against 11.4 GB/s on this machine's Zen cores, data in
  // cache). So large inputs go as three independent streams over the thirds of each block, whose
  // CRCs are then joined (crc32c_combine with a constant shift).
  while (n >= 3 * kStride) {
    uint64_t a = ~crc, b = ~0u, c = ~0u;
    for (size_t i = 0; i < kStride; i += 8) {
      a = _mm_crc32_u64(a, load64(p + i));
      b = _mm_crc32_u64(b, load64(p + kStride + i));
      c = _mm_crc32_u64(c, load64(p + 2 * kStride + i));
    }
    crc = multmodp(kStrideShift, ~uint32_t(a)) ^ ~uint32_t(b);
    crc = multmodp(kStrideShift, crc) ^ ~uint32_t(c);
    p += 3 * kStride;
    n -= 3 * kStride;
  }
  uint64_t c = ~crc;
  while (n >= 8) {
    c = _mm_crc32_u64(c, load64(p));
    p += 8;
    n -= 8;
  }
  uint32_t c32 = uint32_t(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(A‖B) = crc(A)·x^(8·|B|) + crc(B): the pre- and post-conditioning cancel out.
  return multmodp(shift_for(len_b), crc_a) ^ crc_b;
}

}  // namespace kiln
