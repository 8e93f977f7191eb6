// Splitting a loop over the OpenMP threads: evenly (run_spans), or with work stealing for the
// GEMVs of engine/ops/matmul.cpp (run_ranges_stealing).
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kiln::ops {

// Runs body(begin, end) over [0, n) split evenly over `threads` OpenMP threads when n ≥ min_n
// and threads > 1, else inline on the caller: a region costs microseconds, and libgomp allocates a
// team for every region it runs on one thread (so no `if` clause). Allocates nothing.
template <typename Body>
void run_spans(int64_t n, int64_t min_n, int threads, const Body& body) {
  if (threads <= 1 || n < min_n) {
    body(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    body(n * t / nt, n * (t + 1) / nt);
  }
}

// One thread's share of the units, [begin, end) packed into one word (begin in the low half) so
// that its owner taking from the front and a thief taking from the back agree by one
// compare-exchange. A cache line each: the owner's claims stay in its own core's cache.
struct alignas(64) UnitRange {
  std::atomic<uint64_t> word;
};
constexpr int kMaxStealingThreads = 64;

inline uint64_t pack_range(int64_t begin, int64_t end) {
  return uint64_t(begin) | (uint64_t(end) << 32);
}

// Claims up to `chunk` units from the front (front = true) or the back of `r` into [b, e).
inline bool claim_units(UnitRange& r, int64_t chunk, bool front, int64_t& b, int64_t& e) {
  uint64_t cur = r.word.load(std::memory_order_relaxed);
  for (;;) {
    const int64_t lo = int64_t(cur & 0xffffffffu), hi = int64_t(cur >> 32);
    if (lo >= hi) return false;
    b = front ? lo : std::max(lo, hi - chunk);
    e = front ? std::min(hi, lo + chunk) : hi;
    const uint64_t next = front ? pack_range(e, hi) : pack_range(lo, b);
    if (r.word.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return true;
  }
}

// Runs body(begin, end) over [0, units) on `threads` OpenMP threads, every unit exactly once.
// Each thread starts on its own contiguous range (so a GEMV thread streams one contiguous part of
// W) in chunks taken from the front; a thread that runs dry takes chunks from the back of the
// others' ranges. On a shared VM one core is often slowed for a while by its neighbours, and a
// static split then left the other core waiting at the barrier (≈ 7 % of a 16-slot decode step).
// Allocates nothing. Falls back to a static split past kMaxStealingThreads or 2³¹ units, or when
// the runtime gives fewer threads.
template <typename Body>
void run_ranges_stealing(int64_t units, int threads, const Body& body) {
  if (threads > kMaxStealingThreads || units >= (int64_t(1) << 31)) {
    run_spans(units, 0, threads, body);
    return;
  }
  UnitRange ranges[kMaxStealingThreads];  // on the stack: nothing allocated per call
  for (int t = 0; t < threads; ++t)
    ranges[t].word.store(pack_range(units * t / threads, units * (t + 1) / threads),
                         std::memory_order_relaxed);
  const int64_t chunk = std::max<int64_t>(1, units / (int64_t(threads) * 8));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (nt != threads) {
      body(units * t / nt, units * (t + 1) / nt);
    } else {
      int64_t b, e;
      while (claim_units(ranges[t], chunk, true, b, e)) body(b, e);
      for (int i = 1; i < nt; ++i)
        while (claim_units(ranges[(t + i) % nt], chunk, false, b, e)) body(b, e);
    }
  }
}

}  // namespace kiln::ops
