#include "common/process_stats.h"

#include <doctest/doctest.h>

#include <vector>

using namespace kiln;

TEST_CASE("median: the middle value, or the mean of the middle two") {
  CHECK(median({}) == 0.0);
  CHECK(median({7.0}) == 7.0);
  CHECK(median({3.0, 1.0, 2.0}) == 2.0);       // unsorted input
  CHECK(median({4.0, 1.0, 3.0, 2.0}) == 2.5);  // even count
  CHECK(median({5.0, 5.0, 1.0}) == 5.0);
}

TEST_CASE("resident memory and page faults read from this process") {
  CHECK(peak_rss_mib() > 0.0);
  CHECK(current_rss_mib() > 0.0);
  CHECK(current_rss_mib() <= peak_rss_mib() + 1.0);  // statm and rusage round differently
  CHECK(major_page_faults() >= 0);
}
