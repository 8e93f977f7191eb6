// How many threads a decode step runs on, chosen by measuring steps rather than assumed.
//
// The cores an engine was opened for are not always free: another process at the same priority
// (a build, a test run, a second engine) leaves each of two threads about two thirds of a core,
// in time slices that do not line up, and every step's barriers then wait for whichever thread is
// off its core; measured on two cores, two-thread decode fell to 0.3–0.55 of its quiet speed,
// below one thread (docs/performance.md). And a model small enough that a step takes ~0.2 ms is
// faster on one thread even when the machine is quiet. So the governor keeps timing the steps it
// runs at its current count and, now and then, runs a few at a neighbouring count (half or
// double); it moves when the neighbour is clearly faster twice in a row. Probes that do not pay are
// spaced further apart (16 → 512 steps), so on a steady machine they cost ~1 % or less.
//
// Steps are compared only with steps of the same number of rows (slots): a 16-slot step is not a
// 1-slot step. Results do not depend on the count chosen: every per-token product splits its work
// in a way that does not change with the number of threads (engine/ops/matmul.cpp). Allocates
// nothing; not thread-safe (one per model, used by the thread running its passes).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace kiln {

class ThreadGovernor {
 public:
  // `max_threads` ≥ 1: the engine's threads, never exceeded. `adapt` false: always max_threads.
  ThreadGovernor(int max_threads, bool adapt)
      : max_(std::max(max_threads, 1)), current_(max_), adapt_(adapt && max_ > 1) {}

  // Threads for the next step of `rows` rows.
  int threads_for(int64_t rows) {
    if (!adapt_) return max_;
    if (rows != rows_) restart(rows);
    return probing_ ? probe_threads_ : current_;
  }

  // The step begun by the last threads_for(rows) took `seconds`.
  void record(int64_t rows, double seconds) {
    if (!adapt_ || rows != rows_) return;
    if (probing_) {
      probe_[probe_n_++] = seconds;
      if (probe_n_ == kProbeSteps) finish_probe();
      return;
    }
    window_[window_pos_] = seconds;
    window_pos_ = (window_pos_ + 1) % kWindow;
    window_n_ = std::min(window_n_ + 1, kWindow);
    if (window_n_ == kWindow && ++since_probe_ >= period_) start_probe();
  }

  int current() const { return current_; }
  int max_threads() const { return max_; }

 private:
  static constexpr int kWindow = 8;      // recent steps at the current count
  static constexpr int kProbeSteps = 3;  // steps at the neighbouring count
  static constexpr int kFirstPeriod = 16;
  static constexpr int kLastPeriod = 512;
  static constexpr double kMustBeFaster = 0.92;  // a neighbour's median against ours

  void restart(int64_t rows) {
    rows_ = rows;
    probing_ = confirming_ = false;
    window_n_ = window_pos_ = since_probe_ = 0;
    period_ = kFirstPeriod;
  }

  void start_probe() {
    // Downwards from the full count, upwards from one; in between, alternately.
    const bool down = current_ == max_ || (current_ > 1 && probe_down_next_);
    probe_down_next_ = !probe_down_next_;
    probe_threads_ = down ? std::max(1, current_ / 2) : std::min(max_, current_ * 2);
    probing_ = true;
    probe_n_ = 0;
  }

  template <size_t N>
  static double median(std::array<double, N> v, int n) {
    for (int i = 1; i < n; ++i)  // insertion sort: n ≤ 8
      for (int j = i; j > 0 && v[size_t(j)] < v[size_t(j - 1)]; --j)
        std::swap(v[size_t(j)], v[size_t(j - 1)]);
    return n % 2 ? v[size_t(n / 2)] : 0.5 * (v[size_t(n / 2 - 1)] + v[size_t(n / 2)]);
  }

  // A probe that wins is repeated at once, and the count moves only when the repeat wins too: on
  // a shared core one lucky probe is common, and each wrong move costs a window and a period.
  void finish_probe() {
    probing_ = false;
    since_probe_ = 0;
    const bool wins = median(probe_, kProbeSteps) < kMustBeFaster * median(window_, window_n_);
    if (wins && !confirming_) {
      confirming_ = true;
      probing_ = true;
      probe_n_ = 0;
      return;
    }
    confirming_ = false;
    if (wins) {
      current_ = probe_threads_;
      window_n_ = window_pos_ = 0;
      period_ = kFirstPeriod;
    } else {
      period_ = std::min(period_ * 2, kLastPeriod);
    }
  }

  int max_, current_;
  bool adapt_;
  int64_t rows_ = -1;
  std::array<double, kWindow> window_{};
  int window_n_ = 0, window_pos_ = 0;
  std::array<double, kProbeSteps> probe_{};
  int probe_n_ = 0, probe_threads_ = 1;
  bool probing_ = false, confirming_ = false, probe_down_next_ = true;
  int since_probe_ = 0, period_ = kFirstPeriod;
};

}  // namespace kiln
