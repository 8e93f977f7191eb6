#include "engine/golden.h"

#include <cmath>
#include <string>

#include "common/error.h"

namespace kiln {

namespace {

// The first index of the largest value (ties go to the lower id, as greedy sampling picks).
int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

}  // namespace

LogitComparison compare_logits(std::span<const float> actual, std::span<const float> expected,
                               int64_t vocab) {
  if (vocab <= 0 || actual.size() != expected.size() || actual.size() % size_t(vocab) != 0)
    throw Error("compare_logits: " + std::to_string(actual.size()) + " and " +
                std::to_string(expected.size()) + " logits are not the same [positions, " +
                std::to_string(vocab) + "] shape");
  const int64_t positions = int64_t(actual.size()) / vocab;
  LogitComparison c;
  int64_t where = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double d = std::fabs(double(actual[i]) - double(expected[i]));
    if (!(d <= c.max_abs_diff)) {  // also catches NaN
      c.max_abs_diff = std::isnan(d) ? INFINITY : d;
      where = int64_t(i);
    }
  }
  c.max_diff_position = where / vocab;
  c.max_diff_token_id = where % vocab;
  for (int64_t t = 0; t < positions && c.first_top1_mismatch < 0; ++t)
    if (argmax(&actual[size_t(t * vocab)], vocab) != argmax(&expected[size_t(t * vocab)], vocab))
      c.first_top1_mismatch = t;
  return c;
}

}  // namespace kiln
