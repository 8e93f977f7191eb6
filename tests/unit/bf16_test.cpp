#include "common/bf16.h"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

using namespace kiln;

TEST_CASE("f32_to_bf16 rounds to nearest, ties to even") {
  // 1 + 2^-8 lies exactly between bf16 1.0 (even mantissa) and 1 + 2^-7: rounds down to even.
  CHECK(f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80);
  // 1 + 3·2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to even.
  CHECK(f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);
  // Just above the tie rounds up.
  CHECK(f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
  CHECK(f32_to_bf16(-2.0f) == 0xc000);
  CHECK(f32_to_bf16(0.0f) == 0x0000);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
}

TEST_CASE("f32_to_bf16 keeps NaN and Inf, overflows to Inf") {
  uint16_t nan = f32_to_bf16(std::numeric_limits<float>::quiet_NaN());
  CHECK(std::isnan(bf16_to_f32(nan)));
  // A signalling NaN whose payload sits only in the low bits must not become Inf.
  float snan = std::bit_cast<float>(0x7f800001u);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(snan))));
  CHECK(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80);
  CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
}

TEST_CASE("f32_to_bf16 handles subnormals") {
  float tiny = std::numeric_limits<float>::denorm_min() * 3;  // far below bf16 resolution
  CHECK(f32_to_bf16(tiny) == 0x0000);
  float sub = std::bit_cast<float>(0x00018000u);  // subnormal tie: 0x0001 (odd) + half → 0x0002
  CHECK(f32_to_bf16(sub) == 0x0002);
  float sub2 = std::bit_cast<float>(0x00408000u);
  CHECK(f32_to_bf16(sub2) == 0x0040);  // tie with even 0x0040 stays
}

TEST_CASE("bulk conversion equals scalar conversion and counts non-finite values") {
  std::vector<float> x;
  for (int i = 0; i < 1000; ++i)
    x.push_back(std::ldexp(float(i * 7919 % 1013) - 500.5f, i % 40 - 20));
  x[17] = std::numeric_limits<float>::quiet_NaN();
  x[18] = std::numeric_limits<float>::infinity();
  x[999] = -std::numeric_limits<float>::infinity();
  std::vector<uint16_t> y(x.size());
  NonFiniteCounts c = convert_f32_to_bf16(x.data(), y.data(), x.size());
  CHECK(c.nan == 1);
  CHECK(c.inf == 2);
  for (size_t i = 0; i < x.size(); ++i) CHECK(y[i] == f32_to_bf16(x[i]));
}

TEST_CASE("f16_to_f32 decodes normals, subnormals and specials") {
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(std::isinf(f16_to_f32(0x7c00)));
  CHECK(std::isnan(f16_to_f32(0x7e00)));
  CHECK(std::signbit(f16_to_f32(0x8000)));
}
