#include "common/checked.h"

#include <doctest/doctest.h>

#include <vector>

using namespace kiln;

TEST_CASE("checked_mul and checked_add refuse results beyond kMaxSize") {
  CHECK(checked_mul(0, UINT64_MAX) == 0u);
  CHECK(checked_mul(uint64_t(1) << 31, uint64_t(1) << 31) == uint64_t(1) << 62);
  CHECK(checked_mul(uint64_t(1) << 32, uint64_t(1) << 31) == std::nullopt);  // 2^63 > INT64_MAX
  CHECK(checked_mul(uint64_t(1) << 32, uint64_t(1) << 32) == std::nullopt);  // wraps to 0
  CHECK(checked_mul(kMaxSize, 1) == kMaxSize);
  CHECK(checked_add(kMaxSize - 1, 1) == kMaxSize);
  CHECK(checked_add(kMaxSize, 1) == std::nullopt);
  CHECK(checked_add(UINT64_MAX, 1) == std::nullopt);  // wraps to 0
}

TEST_CASE("checked_bytes: product of a shape times the item size, never wrapped") {
  using S = std::vector<int64_t>;
  CHECK(checked_bytes(S{}, 4) == 4u);  // a scalar
  CHECK(checked_bytes(S{3, 5}, 2) == 30u);
  CHECK(checked_bytes(S{7, 0, 9}, 4) == 0u);
  CHECK(checked_bytes(S{-1, 4}, 2) == std::nullopt);
  // The crafted vocabulary of the issue: 2^58 × 64 bf16 values wrap to exactly 0 bytes in 64 bits.
  CHECK(checked_bytes(S{int64_t(1) << 58, 64}, 2) == std::nullopt);
  CHECK(checked_bytes(S{int64_t(1) << 61}, 4) == std::nullopt);
  CHECK(checked_bytes(S{int64_t(1) << 60}, 4) == uint64_t(1) << 62);
  // A partial product that overflows is refused even if a later 0 makes the total 0: walking
  // such a tensor computes that product as a stride.
  CHECK(checked_bytes(S{int64_t(1) << 40, int64_t(1) << 40, 0}, 1) == std::nullopt);
  CHECK(checked_bytes(S{1}, UINT64_MAX) == std::nullopt);
}
