#include "common/crc32c.h"

#include <nmmintrin.h>

#include <array>
#include <cstring>

namespace kiln {

// Built with -msse4.2 for this file only; every x86-64 CPU kiln targets (AVX-512) has it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  // One stream at 8 bytes per 3 cycles (~8 GB/s at 3 GHz); the loader splits large tensors over
  // the threads (crc32c_combine) rather than interleaving streams here.
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

}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(A‖B) = crc(A)·x^(8·|B|) + crc(B): the pre- and post-conditioning cancel out.
  uint32_t shift = 1u << 31;  // x^0
  for (unsigned k = 3; len_b; len_b >>= 1, ++k)
    if (len_b & 1) shift = multmodp(kX2n[k], shift);
  return multmodp(shift, crc_a) ^ crc_b;
}

}  // namespace kiln
