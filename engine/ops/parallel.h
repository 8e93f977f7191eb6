// The one way kiln spreads work over the OpenMP threads (no raw `omp` pragmas elsewhere):
//   run_team            body(t, nt) once on each thread, for work split by hand (team_barrier)
//   run_spans           [0, n) split evenly into one span per thread
//   run_each            body(i) for each i, contiguous blocks of items per thread
//   run_each_dynamic    body(i) for each i, items handed out one at a time
//   run_ranges_stealing [0, units) with work stealing, for the GEMVs of engine/ops/matmul.cpp
// All but run_team run inline on the caller when given one thread: a region costs microseconds,
// and libgomp allocates a team for every region it runs on one thread (so no `if` clause). None
// allocates.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace kiln::ops {

// The number of threads a region gets by default (OMP_NUM_THREADS, or a ScopedThreadCount).
inline int max_threads() {
  return omp_get_max_threads();
}

// Sets the calling thread's OpenMP thread count (the default of its regions, and what oneDNN
// builds primitives for) to n for the scope, then restores it. OpenMP keeps the count per calling
// thread, so an engine running on one thread never changes another's, nor its caller's after the
// call returns. Allocates nothing once the thread has run OpenMP code.
class ScopedThreadCount {
 public:
  explicit ScopedThreadCount(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~ScopedThreadCount() { omp_set_num_threads(saved_); }
  ScopedThreadCount(const ScopedThreadCount&) = delete;
  ScopedThreadCount& operator=(const ScopedThreadCount&) = delete;

 private:
  int saved_;
};

// Runs body(t, nt) on each thread t of a team of nt (≤ threads; the runtime may give fewer)
// OpenMP threads. The caller splits the work by t and nt.
template <typename Body>
void run_team(int threads, const Body& body) {
#pragma omp parallel num_threads(threads)
  body(int64_t(omp_get_thread_num()), int64_t(omp_get_num_threads()));
}

// Inside run_team's body: waits until every thread of the team has reached it.
inline void team_barrier() {
#pragma omp barrier
}

// Runs body(begin, end) over [0, n) split evenly over `threads` OpenMP threads when n ≥ min_n
// and threads > 1, else inline on the caller.
template <typename Body>
void run_spans(int64_t n, int64_t min_n, int threads, const Body& body) {
  if (threads <= 1 || n < min_n) {
    body(int64_t(0), n);
    return;
  }
  run_team(threads, [&](int64_t t, int64_t nt) { body(n * t / nt, n * (t + 1) / nt); });
}

// body(i), or body(i, thread) when it takes the thread number (in [0, threads), e.g. to pick
// that thread's scratch; 0 when inline).
template <typename Body>
void call_item(const Body& body, int64_t i, int thread) {
  if constexpr (std::is_invocable_v<const Body&, int64_t, int>) {
    body(i, thread);
  } else {
    body(i);
  }
}

// Runs body for each item i in [0, n) over `threads` OpenMP threads, each taking one contiguous
// block of items (OpenMP's static schedule), or inline when threads ≤ 1. For items of equal cost.
// body(i) or body(i, thread).
template <typename Body>
void run_each(int64_t n, int threads, const Body& body) {
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) call_item(body, i, 0);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) call_item(body, i, omp_get_thread_num());
}

// The same with the items handed to the threads one at a time, for items of unequal cost (later
// positions attend to more keys).
template <typename Body>
void run_each_dynamic(int64_t n, int threads, const Body& body) {
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) call_item(body, i, 0);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) call_item(body, i, omp_get_thread_num());
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
  run_team(threads, [&](int64_t t, int64_t nt) {
    if (nt != threads) {
      body(units * t / nt, units * (t + 1) / nt);
    } else {
      int64_t b, e;
      while (claim_units(ranges[t], chunk, true, b, e)) body(b, e);
      for (int64_t i = 1; i < nt; ++i)
        while (claim_units(ranges[(t + i) % nt], chunk, false, b, e)) body(b, e);
    }
  });
}

}  // namespace kiln::ops
