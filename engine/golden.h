// The comparison behind `kiln golden check`: the logits of one prefill against golden logits
// written earlier (by `kiln golden dump` or a reference implementation).
#pragma once

#include <cstdint>
#include <span>

namespace kiln {

struct LogitComparison {
  // The largest |actual - expected| over all logits; infinity when any difference is NaN.
  double max_abs_diff = 0;
  // Where that largest difference is (the last NaN when there are NaNs).
  int64_t max_diff_position = 0;
  int64_t max_diff_token_id = 0;
  // The first position whose top-1 (argmax) token differs, or -1 when every position agrees.
  int64_t first_top1_mismatch = -1;

  // Within `atol` everywhere and the same top-1 token at every position.
  bool passes(double atol) const { return max_abs_diff <= atol && first_top1_mismatch < 0; }
};

// Compares row-major [positions, vocab] logits; `actual` and `expected` have the same size, a
// multiple of `vocab` (> 0).
LogitComparison compare_logits(std::span<const float> actual, std::span<const float> expected,
                               int64_t vocab);

}  // namespace kiln
