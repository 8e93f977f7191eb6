#include "engine/thread_governor.h"

#include <doctest/doctest.h>

#include <functional>

namespace {

// Runs `steps` decode steps of `rows` rows whose duration depends on the thread count; returns
// how many ran at each count (index 0 unused).
std::vector<int> simulate(kiln::ThreadGovernor& g, int steps, int64_t rows,
                          const std::function<double(int)>& seconds) {
  std::vector<int> ran(size_t(g.max_threads()) + 1, 0);
  for (int i = 0; i < steps; ++i) {
    const int n = g.threads_for(rows);
    REQUIRE(n >= 1);
    REQUIRE(n <= g.max_threads());
    ++ran[size_t(n)];
    g.record(rows, seconds(n));
  }
  return ran;
}

}  // namespace

TEST_CASE("ThreadGovernor keeps every thread when more threads are faster, probing rarely") {
  kiln::ThreadGovernor g(2, true);
  const std::vector<int> ran = simulate(g, 4000, 1, [](int n) { return 1.0 / n; });
  CHECK(g.current() == 2);
  CHECK(ran[1] < 4000 / 50);  // probes back off: under 2 % of the steps on one thread
}

TEST_CASE("ThreadGovernor moves to one thread when it is clearly faster (cores taken)") {
  kiln::ThreadGovernor g(2, true);
  simulate(g, 200, 1, [](int n) { return n == 2 ? 3.0 : 1.0; });
  CHECK(g.current() == 1);
  // ... and back when the load goes away.
  simulate(g, 400, 1, [](int n) { return 1.0 / n; });
  CHECK(g.current() == 2);
}

TEST_CASE("ThreadGovernor does not move for a difference within the noise margin") {
  kiln::ThreadGovernor g(2, true);
  simulate(g, 2000, 1, [](int n) { return n == 1 ? 0.97 : 1.0; });
  CHECK(g.current() == 2);
}

TEST_CASE("ThreadGovernor halves and doubles on larger machines") {
  kiln::ThreadGovernor g(8, true);
  // Best at 2 threads: 8 → 4 → 2, and it stays there.
  simulate(g, 3000, 1, [](int n) { return n == 2 ? 1.0 : n == 4 ? 1.5 : n == 1 ? 1.8 : 3.0; });
  CHECK(g.current() == 2);
}

TEST_CASE("ThreadGovernor compares steps of the same row count only, and can be turned off") {
  kiln::ThreadGovernor g(2, true);
  // Alternating row counts restart the measurement: no probe, no move.
  for (int i = 0; i < 500; ++i) {
    const int64_t rows = 1 + i % 2;
    CHECK(g.threads_for(rows) == 2);
    g.record(rows, rows == 1 ? 1.0 : 100.0);
  }
  kiln::ThreadGovernor fixed(2, false);
  const std::vector<int> ran = simulate(fixed, 300, 1, [](int n) { return n == 2 ? 3.0 : 1.0; });
  CHECK(ran[2] == 300);
  CHECK(kiln::ThreadGovernor(1, true).threads_for(1) == 1);
}
