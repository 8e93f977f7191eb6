#include "common/zeroed_vector.h"

#include <doctest/doctest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

namespace {

// Pages of [p, p + bytes) resident in memory.
size_t resident_pages(const void* p, size_t bytes) {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in((bytes + page - 1) / page);
  REQUIRE(::mincore(const_cast<void*>(p), bytes, in.data()) == 0);
  size_t n = 0;
  for (unsigned char c : in) n += c & 1;
  return n;
}

}  // namespace

TEST_CASE("ZeroedVector: every element zero, and no page touched until used") {
  const size_t n = size_t(64) << 20;  // 128 MiB of uint16_t
  kiln::ZeroedVector<uint16_t> v(n);
  REQUIRE(v.size() == n);
  CHECK(resident_pages(v.data(), n * sizeof(uint16_t)) == 0);
  v[12345] = 7;  // one page (a 2 MiB one where transparent huge pages are "always")
  CHECK(resident_pages(v.data(), n * sizeof(uint16_t)) <= 512);
  size_t nonzero = 0;
  for (size_t i = 0; i < n; i += 997) nonzero += v[i] != 0;
  CHECK(nonzero == 0);  // 12345 is not a multiple of 997
  CHECK(v[12345] == 7);

  // Several of them, as a KV cache holds them: each its own zero pages.
  std::vector<kiln::ZeroedVector<float>> layers;
  for (int l = 0; l < 4; ++l) layers.emplace_back(size_t(1) << 20);
  layers[1][5] = 1.5f;
  CHECK(layers[0][5] == 0.0f);
  CHECK(layers[1][5] == 1.5f);
  kiln::ZeroedVector<float> copy = layers[1];  // a copy copies the values
  CHECK(copy[5] == 1.5f);
  CHECK(copy[6] == 0.0f);
}
