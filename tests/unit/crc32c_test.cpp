#include "common/crc32c.h"

#include <doctest/doctest.h>

#include <cstring>
#include <string>

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
