#include "engine/golden.h"

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "common/error.h"

using namespace kiln;

TEST_CASE("compare_logits: identical logits pass any atol") {
  const std::vector<float> x = {0.f, 1.f, 2.f, 3.f, 2.f, 1.f};
  const LogitComparison c = compare_logits(x, x, 3);
  CHECK(c.max_abs_diff == 0.0);
  CHECK(c.first_top1_mismatch == -1);
  CHECK(c.passes(0.0));
}

TEST_CASE("compare_logits: largest difference and where it is") {
  const std::vector<float> expected = {0.f, 1.f, 2.f, 3.f, 2.f, 1.f};
  std::vector<float> actual = expected;
  actual[1] += 0.25f;  // position 0, id 1
  actual[5] -= 0.5f;   // position 1, id 2: the largest
  const LogitComparison c = compare_logits(actual, expected, 3);
  CHECK(c.max_abs_diff == doctest::Approx(0.5));
  CHECK(c.max_diff_position == 1);
  CHECK(c.max_diff_token_id == 2);
  CHECK(c.first_top1_mismatch == -1);  // argmax stays 2 and 0
  CHECK(c.passes(0.5));
  CHECK_FALSE(c.passes(0.4));
}

TEST_CASE("compare_logits: a differing top-1 token fails even within atol") {
  const std::vector<float> expected = {0.f, 1.f, 1.01f, 3.f, 2.f, 1.f};
  const std::vector<float> actual = {0.f, 1.02f, 1.01f, 3.f, 2.f, 1.f};
  const LogitComparison c = compare_logits(actual, expected, 3);
  CHECK(c.first_top1_mismatch == 0);
  CHECK_FALSE(c.passes(1.0));
}

TEST_CASE("compare_logits: a NaN counts as an infinite difference") {
  const std::vector<float> expected = {0.f, 1.f, 2.f, 3.f};
  std::vector<float> actual = expected;
  actual[2] = NAN;
  const LogitComparison c = compare_logits(actual, expected, 2);
  CHECK(std::isinf(c.max_abs_diff));
  CHECK(c.max_diff_position == 1);
  CHECK(c.max_diff_token_id == 0);
  CHECK_FALSE(c.passes(1e30));
}

TEST_CASE("compare_logits: mismatched sizes are refused") {
  const std::vector<float> a = {0.f, 1.f, 2.f, 3.f}, b = {0.f, 1.f};
  CHECK_THROWS_AS(compare_logits(a, b, 2), Error);
  CHECK_THROWS_AS(compare_logits(a, a, 3), Error);
}
