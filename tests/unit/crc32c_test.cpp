#include "common/crc32c.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

TEST_CASE("crc32c matches the standard check values") {
  const char* s = "123456789";
  CHECK(kiln::crc32c(s, 9) == 0xe3069283u);  // the CRC-32C check value (RFC 3720)
  CHECK(kiln::crc32c(nullptr, 0) == 0u);
  unsigned char zeros[32] = {};
  CHECK(kiln::crc32c(zeros, 32) == 0x8a9136aau);  // RFC 3720 B.4
}

TEST_CASE("crc32c can be computed incrementally") {
  std::string s = "The quick brown fox jumps over the lazy dog, twice over.";
  uint32_t whole = kiln::crc32c(s.data(), s.size());
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    uint32_t part = kiln::crc32c(s.data(), cut);
    CHECK(kiln::crc32c(s.data() + cut, s.size() - cut, part) == whole);
  }
}

namespace {

// Bit by bit, straight from the definition (reflected 0x82f63b78, pre- and post-inverted).
uint32_t crc32c_reference(const uint8_t* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  while (n--) {
    crc ^= *p++;
    for (int k = 0; k < 8; ++k) crc = crc & 1 ? (crc >> 1) ^ 0x82f63b78u : crc >> 1;
  }
  return ~crc;
}

}  // namespace

TEST_CASE("crc32c over large inputs (three interleaved streams) equals the definition") {
  std::mt19937_64 rng(7);
  std::vector<uint8_t> data((size_t(1) << 20) + 123);
  for (auto& b : data) b = uint8_t(rng());
  for (size_t n : {size_t(0), size_t(95 << 10), size_t(96 << 10), size_t(96 << 10) + 5,
                   size_t(200000), size_t(3 << 18), data.size()}) {
    CAPTURE(n);
    const uint32_t want = crc32c_reference(data.data(), n);
    CHECK(kiln::crc32c(data.data(), n) == want);
    // Continuing from a CRC, and from an unaligned start.
    const size_t cut = n / 3 + 1;
    if (cut <= n)
      CHECK(kiln::crc32c(data.data() + cut, n - cut, kiln::crc32c(data.data(), cut)) == want);
    if (n > 1)
      CHECK(kiln::crc32c(data.data() + 1, n - 1) == crc32c_reference(data.data() + 1, n - 1));
  }
}

TEST_CASE("crc32c_combine joins the CRCs of consecutive pieces") {
  std::mt19937_64 rng(42);
  std::vector<uint8_t> data(1 << 16);
  for (auto& b : data) b = uint8_t(rng());
  const uint32_t whole = kiln::crc32c(data.data(), data.size());
  CHECK(kiln::crc32c_combine(whole, kiln::crc32c(nullptr, 0), 0) == whole);
  CHECK(kiln::crc32c_combine(0, whole, data.size()) == whole);  // an empty first piece
  for (int trial = 0; trial < 200; ++trial) {
    // Random cuts into up to 5 pieces, combined left to right, as the loader's threads do.
    const size_t n = 1 + rng() % data.size();
    std::vector<size_t> cuts = {0, n};
    for (int i = int(rng() % 4); i > 0; --i) cuts.push_back(rng() % (n + 1));
    std::sort(cuts.begin(), cuts.end());
    uint32_t crc = 0;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      const size_t len = cuts[i + 1] - cuts[i];
      crc = kiln::crc32c_combine(crc, kiln::crc32c(data.data() + cuts[i], len), len);
    }
    CAPTURE(n);
    CHECK(crc == kiln::crc32c(data.data(), n));
  }
}

TEST_CASE("crc32c_combine handles lengths beyond any buffer") {
  // crc(zeros of length 2^k) can be built by doubling: combine(c, c, len) = crc of twice len.
  uint32_t c = kiln::crc32c("\0", 1);
  uint64_t len = 1;
  for (int k = 0; k < 40; ++k, len *= 2) c = kiln::crc32c_combine(c, c, len);
  // ... and one more doubling from the other side agrees with a direct shift of 2^40 zero bytes.
  std::vector<uint8_t> z(4096);
  uint32_t page = kiln::crc32c(z.data(), z.size());
  uint32_t big = page;
  for (uint64_t l = z.size(); l < (uint64_t(1) << 40); l *= 2)
    big = kiln::crc32c_combine(big, big, l);
  CHECK(big == c);
}
