// Linear against a naive reference: every input is a bf16 value, so each product is exact in f32
// and the only difference to the double-precision reference is the summation order.
#include "engine/ops/matmul.h"

#include <doctest/doctest.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "engine/ops/parallel.h"
#include "schema/tensor_layout.h"
#include "tests/unit/ops_test_support.h"

namespace {

using kiln::ops::Linear;
using kiln::ops::LinearOptions;

std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = kiln::f32_to_bf16(dist(rng));
  return v;
}

// Checks y (M×N) against x·W computed in double, within a bound scaled by Σ|x·w| per output.
void check(const std::vector<uint16_t>& x, const std::vector<uint16_t>& w, int64_t M, int64_t K,
           int64_t N, const float* y) {
  std::vector<double> ref(static_cast<size_t>(N)), mag(static_cast<size_t>(N));
  for (int64_t m = 0; m < M; ++m) {
    std::fill(ref.begin(), ref.end(), 0.0);
    std::fill(mag.begin(), mag.end(), 0.0);
    for (int64_t k = 0; k < K; ++k) {  // row by row: W is read in order
      const double xk = kiln::bf16_to_f32(x[size_t(m * K + k)]);
      const uint16_t* wk = w.data() + k * N;
      for (int64_t n = 0; n < N; ++n) {
        const double p = xk * double(kiln::bf16_to_f32(wk[n]));
        ref[size_t(n)] += p;
        mag[size_t(n)] += std::fabs(p);
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const double err = std::fabs(double(y[m * N + n]) - ref[size_t(n)]);
      if (err > 1e-5 * mag[size_t(n)] + 1e-6) {
        FAIL_CHECK("y[" << m << "," << n << "] = " << y[m * N + n] << ", expected "
                        << ref[size_t(n)] << " (M=" << M << " K=" << K << " N=" << N << ")");
        return;
      }
    }
  }
}

// Runs forward with x and y in buffers of exactly M rows followed by NaN / sentinel guards, so any
// read past row M would poison the result and any write past it would be seen.
void run_and_check(const Linear& lin, const std::vector<uint16_t>& w, int64_t M, uint32_t seed) {
  const int64_t K = lin.K(), N = lin.N();
  std::vector<uint16_t> x = random_bf16(size_t(M * K), seed);
  std::vector<uint16_t> xg(x);
  xg.resize(x.size() + size_t(K) + 64, 0x7fc0);  // bf16 NaN after the last row
  const float sentinel = 12345.0f;
  std::vector<float> y(size_t(M * N) + 64, sentinel);
  lin.forward(xg.data(), M, y.data());
  check(x, w, M, K, N, y.data());
  for (size_t i = size_t(M * N); i < y.size(); ++i) REQUIRE(y[i] == sentinel);
}

// Linears built inside the scope use `n` threads. Most cases use one: the shapes are tiny, and on a
// shared machine every multi-threaded call can wait a scheduler slice for its second thread.
using Threads = kiln::ops::ScopedThreadCount;

}  // namespace

TEST_CASE("Linear matches a naive reference for many shapes") {
  const Threads one(1);
  struct Shape {
    int64_t K, N, max_m;
  };
  // K and N off the 16/32/64 grids, tiny and odd sizes, one realistic-width case, and K past
  // the GEMV's 2048-row panels (several panels added up; an odd last row in the last one).
  const Shape shapes[] = {{64, 64, 40},  {33, 70, 40},   {100, 200, 40}, {1, 1, 20},    {7, 3, 20},
                          {130, 17, 20}, {2048, 96, 40}, {4099, 70, 17}, {6144, 64, 16}};
  for (const Shape& s : shapes) {
    const std::vector<uint16_t> w = random_bf16(size_t(s.K * s.N), uint32_t(s.K * 7 + s.N));
    for (bool relayout : {true, false}) {
      CAPTURE(s.K);
      CAPTURE(s.N);
      CAPTURE(relayout);
      LinearOptions opt;
      opt.max_m = s.max_m;
      opt.relayout = relayout;
      const Linear lin(w.data(), s.K, s.N, opt);
      CHECK(lin.K() == s.K);
      CHECK(lin.N() == s.N);
      if (!relayout) CHECK_FALSE(lin.owns_weights());
      // M = 1..6 cover the GEMV and small buckets; 17, 33, 37 are not buckets (split calls);
      // 32 is a bucket; max_m itself is the edge.
      const std::vector<int64_t> ms = {1, 2, 3, 4, 5, 6, 16, 17, 32, 33, 37, s.max_m};
      for (int64_t M : ms) {
        if (M > s.max_m) continue;
        CAPTURE(M);
        run_and_check(lin, w, M, uint32_t(M * 31 + s.K));
      }
    }
  }
}

TEST_CASE("Linear with transposed weights ([N, K], e.g. a tied embedding)") {
  const Threads one(1);
  const std::pair<int64_t, int64_t> shapes[] = {{33, 70}, {128, 200}, {95, 17}};
  for (const auto& [K, N] : shapes) {
    const std::vector<uint16_t> w = random_bf16(size_t(K * N), uint32_t(K + N));
    std::vector<uint16_t> wt(w.size());
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) wt[size_t(n * K + k)] = w[size_t(k * N + n)];
    for (bool relayout : {true, false}) {
      CAPTURE(K);
      CAPTURE(N);
      CAPTURE(relayout);
      LinearOptions opt;
      opt.max_m = 40;
      opt.relayout = relayout;
      opt.transposed = true;
      const Linear lin(wt.data(), K, N, opt);
      for (int64_t M : {1, 5, 16, 17, 37}) {
        CAPTURE(M);
        run_and_check(lin, w, M, uint32_t(M * 3));
      }
    }
  }
}

TEST_CASE("Linear: every GEMV row count and the brgemm switch-over agree") {
  const Threads one(1);
  const int64_t K = 129, N = 130;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 5);
  // 100 is clamped to 16; with 16, M = 17..31 split into the 16-row bucket plus GEMV rows.
  for (bool relayout : {true, false}) {
    for (int64_t gemv : {0, 1, 4, 9, 16, 100}) {
      CAPTURE(relayout);
      CAPTURE(gemv);
      LinearOptions opt;
      opt.max_m = 34;
      opt.relayout = relayout;
      opt.gemv_max_m = gemv;
      const Linear lin(w.data(), K, N, opt);
      for (int64_t M = 1; M <= 34; ++M) {
        CAPTURE(M);
        run_and_check(lin, w, M, uint32_t(M));
      }
    }
  }
}

TEST_CASE("Linear: prefill-sized M split across buckets") {
  const Threads one(1);
  const int64_t K = 96, N = 80;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 11);
  LinearOptions opt;
  opt.max_m = 700;  // beyond 512 the buckets step by 128
  const Linear lin(w.data(), K, N, opt);
  for (int64_t M : {47, 128, 300, 511, 512, 513, 650, 700}) {
    CAPTURE(M);
    run_and_check(lin, w, M, uint32_t(M));
  }
}

TEST_CASE("Linear: primitives above eager_max_m are created by the first forward that needs them") {
  const Threads one(1);
  const int64_t K = 96, N = 80;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 12);
  kiln::ops::MatmulContext eager_ctx, lazy_ctx;
  LinearOptions eager;
  eager.max_m = 300;
  eager.context = &eager_ctx;
  LinearOptions lazy = eager;
  lazy.eager_max_m = 4;
  lazy.context = &lazy_ctx;
  const Linear a(w.data(), K, N, eager), b(w.data(), K, N, lazy);
  for (int64_t M : {1, 4, 17, 100, 300, 100}) {
    CAPTURE(M);
    run_and_check(b, w, M, uint32_t(M));
    const std::vector<uint16_t> x = random_bf16(size_t(M * K), uint32_t(M) + 7);
    std::vector<float> ya(size_t(M * N)), yb(size_t(M * N));
    a.forward(x.data(), M, ya.data());
    b.forward(x.data(), M, yb.data());
    CHECK(std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)) == 0);  // same kernels
  }
}

TEST_CASE("Linear with relayout owns its copy; without it reads W in place, never writing it") {
  const Threads one(1);
  const int64_t K = 96, N = 160;
  std::vector<uint16_t> w = random_bf16(size_t(K * N), 3);
  LinearOptions opt;
  opt.max_m = 20;
  {
    std::vector<uint16_t> scratch(w);
    const Linear lin(scratch.data(), K, N, opt);
    if (lin.owns_weights()) {
      std::fill(scratch.begin(), scratch.end(), uint16_t(0x7fc0));  // NaN everywhere
      run_and_check(lin, w, 1, 1);
      run_and_check(lin, w, 19, 2);
    }
  }
  {
    // Read-only pages: any write to W by oneDNN (e.g. zero padding) would fault.
    const size_t bytes = w.size() * sizeof(uint16_t);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    std::memcpy(p, w.data(), bytes);
    REQUIRE(mprotect(p, bytes, PROT_READ) == 0);
    opt.relayout = false;
    {
      const Linear lin(static_cast<const uint16_t*>(p), K, N, opt);
      CHECK_FALSE(lin.owns_weights());
      for (int64_t M : {1, 2, 16, 19, 20}) run_and_check(lin, w, M, uint32_t(M));
    }
    munmap(p, bytes);
  }
}

TEST_CASE("Linear with two threads: the GEMV and brgemm split the work correctly") {
  const Threads two(2);
  // 9 column blocks (an odd split) and enough work for the GEMV to go parallel.
  const int64_t K = 515, N = 570;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 13);
  std::vector<uint16_t> wt(w.size());
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) wt[size_t(n * K + k)] = w[size_t(k * N + n)];
  for (bool transposed : {false, true}) {
    for (bool relayout : {true, false}) {
      for (int64_t gemv : {-1, 16}) {  // default, and every M ≤ 16 through the GEMV
        CAPTURE(transposed);
        CAPTURE(relayout);
        CAPTURE(gemv);
        LinearOptions opt;
        opt.max_m = 40;
        opt.relayout = relayout;
        opt.transposed = transposed;
        opt.gemv_max_m = gemv;
        const Linear lin(transposed ? wt.data() : w.data(), K, N, opt);
        const std::vector<int64_t> ms =
            gemv < 0 ? std::vector<int64_t>{1, 3, 21, 40} : std::vector<int64_t>{13};
        for (int64_t M : ms) {
          CAPTURE(M);
          run_and_check(lin, w, M, uint32_t(M + 100));
        }
      }
    }
  }
}

TEST_CASE("Linear built for two threads gives the same bits when a call runs on one") {
  // The decode thread governor (engine/thread_governor.h) may run a step on fewer threads than
  // its Linears were built for; the GEMVs must not change a bit (plain W sums fixed bands).
  const int64_t K = 1030, N = 570;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 17);
  for (bool relayout : {true, false}) {
    for (bool transposed : {false, true}) {
      CAPTURE(relayout);
      CAPTURE(transposed);
      std::optional<Linear> lin;
      {
        const Threads two(2);
        LinearOptions opt;
        opt.max_m = 16;
        opt.relayout = relayout;
        opt.transposed = transposed;
        opt.gemv_max_m = 16;
        lin.emplace(w.data(), transposed ? N : K, transposed ? K : N, opt);
      }
      for (int64_t M : {1, 4, 16}) {
        CAPTURE(M);
        const std::vector<uint16_t> x = random_bf16(size_t(M * lin->K()), uint32_t(M));
        std::vector<float> y2(size_t(M * lin->N())), y1(y2.size());
        {
          const Threads two(2);
          lin->forward(x.data(), M, y2.data());
        }
        {
          const Threads one(1);
          lin->forward(x.data(), M, y1.data());
        }
        CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("Linear computes W's CRC-32C in its re-layout pass, on any number of threads") {
  for (int threads : {1, 2}) {
    for (const auto& [K, N] : {std::pair<int64_t, int64_t>{515, 570}, {2048, 512}, {3, 64}}) {
      CAPTURE(threads);
      CAPTURE(K);
      CAPTURE(N);
      const Threads t(threads);
      const std::vector<uint16_t> w = random_bf16(size_t(K * N), uint32_t(K));
      LinearOptions opt;
      opt.max_m = 4;
      opt.checksum_weights = true;
      const Linear lin(w.data(), K, N, opt);
      const uint32_t want = kiln::crc32c(w.data(), w.size() * sizeof(uint16_t));
      if (lin.owns_weights() && lin.weights_crc32c()) CHECK(*lin.weights_crc32c() == want);
      // Without the option, or used in place, nothing is claimed.
      opt.checksum_weights = false;
      CHECK_FALSE(Linear(w.data(), K, N, opt).weights_crc32c());
      opt.checksum_weights = true;
      opt.relayout = false;
      CHECK_FALSE(Linear(w.data(), K, N, opt).weights_crc32c());
      run_and_check(lin, w, 3, 5);
    }
  }
  // The 1B shapes are re-laid by the hand-written pass: the CRC must be there.
  const Threads two(2);
  const std::vector<uint16_t> w = random_bf16(size_t(2048 * 512), 3);
  LinearOptions opt;
  opt.checksum_weights = true;
  const Linear lin(w.data(), 2048, 512, opt);
  if (lin.owns_weights()) {
    REQUIRE(lin.weights_crc32c());
    CHECK(*lin.weights_crc32c() == kiln::crc32c(w.data(), w.size() * sizeof(uint16_t)));
  }
}

TEST_CASE("Linear on weights stored blocked gives the bits of the same weights row-major") {
  // In place where this CPU's kernels want BA16a64b2a (the 1B-sized shape), converted back to
  // row-major where they want something else (tiny shapes), re-laid or not.
  for (const auto& [K, N] : {std::pair<int64_t, int64_t>{2048, 512}, {515, 570}, {3, 5}}) {
    for (bool relayout : {true, false}) {
      CAPTURE(K);
      CAPTURE(N);
      CAPTURE(relayout);
      const Threads two(2);
      const std::vector<uint16_t> w = random_bf16(size_t(K * N), uint32_t(K + N));
      const kiln::BlockedMatrices m{1, K, N};
      std::vector<uint16_t> blocked(size_t(m.values()));
      kiln::to_ba16a64b2a(w.data(), m, blocked.data());
      LinearOptions opt;
      opt.max_m = 24;
      opt.relayout = relayout;
      LinearOptions blocked_opt = opt;
      blocked_opt.weights_blocked = true;
      const Linear lin(blocked.data(), K, N, blocked_opt);
      // Used in place, it is the re-laid W of a row-major Linear (same layout, same kernels);
      // converted back, the row-major W of one with the same options.
      const bool in_place = !lin.owns_weights();
      opt.relayout = relayout || in_place;
      const Linear plain(w.data(), K, N, opt);
      for (int64_t M : {1, 5, 24}) {
        CAPTURE(M);
        const std::vector<uint16_t> x = random_bf16(size_t(M * K), uint32_t(M));
        std::vector<float> y0(size_t(M * N)), y1(y0.size());
        plain.forward(x.data(), M, y0.data());
        lin.forward(x.data(), M, y1.data());
        CHECK(std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) == 0);
      }
      if (K == 2048 && relayout && plain.owns_weights()) CHECK(in_place);
    }
  }
}

TEST_CASE("Linear with two threads: work stealing covers every column block once, every time") {
  const Threads two(2);
  // 40 column blocks, claimed a few at a time from both ends: which thread computes which block
  // varies from call to call, the result must not.
  const int64_t K = 515, N = 40 * 64 - 7;
  const std::vector<uint16_t> w = random_bf16(size_t(K * N), 17);
  LinearOptions opt;
  opt.max_m = 16;
  const Linear lin(w.data(), K, N, opt);
  for (int64_t M : {1, 16}) {
    CAPTURE(M);
    const std::vector<uint16_t> x = random_bf16(size_t(M * K), uint32_t(M + 7));
    std::vector<float> first(size_t(M * N)), y(size_t(M * N));
    lin.forward(x.data(), M, first.data());
    check(x, w, M, K, N, first.data());
    for (int rep = 0; rep < 50; ++rep) {
      std::fill(y.begin(), y.end(), std::numeric_limits<float>::quiet_NaN());
      lin.forward(x.data(), M, y.data());
      REQUIRE(std::memcmp(y.data(), first.data(), y.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("run_ranges_stealing: every unit once, and a stalled thread's work is taken over") {
  for (int64_t units : {1, 2, 7, 40, 1000}) {
    CAPTURE(units);
    std::vector<std::atomic<int>> seen(static_cast<size_t>(units));
    std::atomic<int64_t> by_thread0{0}, by_thread1{0};
    bool thread1_started = false;  // touched by thread 1 only
    kiln::ops::run_ranges_stealing(units, 2, [&](int64_t b, int64_t e) {
      if (omp_get_thread_num() == 1) {
        if (!thread1_started) {  // stall on the first chunk until thread 0 has done the rest
          thread1_started = true;
          for (int i = 0; i < 20000 && by_thread0.load() + (e - b) < units; ++i)
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        by_thread1 += e - b;
      } else {
        by_thread0 += e - b;
      }
      for (int64_t u = b; u < e; ++u) seen[size_t(u)]++;
    });
    for (int64_t u = 0; u < units; ++u) CHECK(seen[size_t(u)].load() == 1);
    // Thread 1 ran only the chunk it took before stalling; thread 0 stole the rest of its range.
    CHECK(by_thread1.load() <= std::max<int64_t>(1, units / 16));
  }
}

TEST_CASE("forward_together gives each call's forward() bits, in one pass or in turn") {
  // q/k/v-like Linears sharing K (N not a multiple of the 64-column block), built for two
  // threads; a plain (in place) one makes the group fall back to one forward() each.
  const int64_t K = 1030;
  const int64_t Ns[] = {570, 130, 130};
  std::vector<std::vector<uint16_t>> ws;
  for (int i = 0; i < 3; ++i) ws.push_back(random_bf16(size_t(K * Ns[i]), uint32_t(40 + i)));
  for (bool all_blocked : {true, false}) {
    CAPTURE(all_blocked);
    std::vector<Linear> lins;
    {
      const Threads two(2);
      for (int i = 0; i < 3; ++i) {
        LinearOptions opt;
        opt.max_m = 64;
        opt.relayout = all_blocked || i != 1;
        lins.emplace_back(ws[size_t(i)].data(), K, Ns[i], opt);
      }
    }
    for (int64_t M : {1, 3, 16, 40}) {  // 40: oneDNN, not the GEMV, so one forward() each
      for (int threads : {1, 2}) {
        CAPTURE(M);
        CAPTURE(threads);
        const Threads scope(threads);
        std::vector<std::vector<uint16_t>> xs;
        std::vector<std::vector<float>> alone, together;
        std::vector<kiln::ops::LinearCall> calls;
        for (int i = 0; i < 3; ++i) {  // the first two share x, the third has its own
          xs.push_back(random_bf16(size_t(M * K), uint32_t(M * 10 + i)));
          alone.emplace_back(size_t(M * Ns[i]));
          together.emplace_back(size_t(M * Ns[i]), -1.0f);
        }
        for (int i = 0; i < 3; ++i) {
          const uint16_t* x = xs[i == 1 ? 0 : size_t(i)].data();
          lins[size_t(i)].forward(x, M, alone[size_t(i)].data());
          calls.push_back({&lins[size_t(i)], x, M, together[size_t(i)].data()});
        }
        kiln::ops::forward_together(calls);
        for (int i = 0; i < 3; ++i)
          CHECK(std::memcmp(alone[size_t(i)].data(), together[size_t(i)].data(),
                            alone[size_t(i)].size() * sizeof(float)) == 0);
        if (M <= 16 && all_blocked) {  // the shared pass allocates nothing
          CHECK(kiln::ops::test::allocations_of([&] { kiln::ops::forward_together(calls); }) == 0);
        }
      }
    }
  }
}

TEST_CASE("forward_together checks every call as forward() does") {
  const std::vector<uint16_t> w = random_bf16(64 * 64, 5), x = random_bf16(64 * 4, 6);
  LinearOptions opt;
  opt.max_m = 4;
  const Linear a(w.data(), 64, 64, opt), b(w.data(), 64, 64, opt);
  std::vector<float> y(64 * 5), z(64 * 5);
  const kiln::ops::LinearCall too_many[] = {{&a, x.data(), 1, y.data()},
                                            {&b, x.data(), 5, z.data()}};
  CHECK_THROWS_AS(kiln::ops::forward_together(too_many), kiln::Error);
  const kiln::ops::LinearCall no_linear[] = {{nullptr, x.data(), 1, y.data()}};
  CHECK_THROWS_AS(kiln::ops::forward_together(no_linear), kiln::Error);
  CHECK_NOTHROW(kiln::ops::forward_together({}));  // nothing to run
}

TEST_CASE("Linear refuses blocked weights it is asked to read transposed") {
  const std::vector<uint16_t> w(size_t(32 * 64), 0);
  LinearOptions opt;
  opt.weights_blocked = true;
  opt.transposed = true;
  CHECK_THROWS_WITH_AS(Linear(w.data(), 32, 64, opt),
                       doctest::Contains("blocked weights cannot be transposed"), kiln::Error);
}

TEST_CASE("Linear rejects bad shapes and M outside 1..max_m") {
  const std::vector<uint16_t> w = random_bf16(64 * 32, 1);
  LinearOptions opt;
  opt.max_m = 8;
  const Linear lin(w.data(), 64, 32, opt);
  std::vector<uint16_t> x(9 * 64, 0);
  std::vector<float> y(9 * 32, 0);
  CHECK_THROWS_AS(lin.forward(x.data(), 9, y.data()), kiln::Error);
  CHECK_THROWS_AS(lin.forward(x.data(), 0, y.data()), kiln::Error);
  CHECK_THROWS_AS(lin.forward(x.data(), -1, y.data()), kiln::Error);
  CHECK_NOTHROW(lin.forward(x.data(), 8, y.data()));
  CHECK_THROWS_AS(Linear(nullptr, 64, 32), kiln::Error);
  CHECK_THROWS_AS(Linear(w.data(), 0, 32), kiln::Error);
  CHECK_THROWS_AS(Linear(w.data(), 64, 0), kiln::Error);
  LinearOptions bad;
  bad.max_m = 0;
  CHECK_THROWS_AS(Linear(w.data(), 64, 32, bad), kiln::Error);
}

TEST_CASE("Linear move construction and assignment") {
  const int64_t K = 48, N = 72;
  const std::vector<uint16_t> w1 = random_bf16(size_t(K * N), 21);
  const std::vector<uint16_t> w2 = random_bf16(size_t(K * N), 22);
  LinearOptions opt;
  opt.max_m = 4;
  Linear a(w1.data(), K, N, opt);
  Linear b(std::move(a));
  CHECK(a.K() == 0);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  CHECK(b.K() == K);
  run_and_check(b, w1, 3, 1);
  std::vector<uint16_t> x(size_t(K), 0);
  std::vector<float> y(size_t(N), 0);
  CHECK_THROWS_AS(a.forward(x.data(), 1, y.data()), kiln::Error);

  Linear c(w2.data(), K, N, opt);
  c = std::move(b);  // c's own weights and primitives are released; it now computes with w1
  run_and_check(c, w1, 4, 2);
  CHECK(b.N() == 0);  // NOLINT(bugprone-use-after-move)
  a = std::move(c);   // a moved-from object can be assigned to again
  run_and_check(a, w1, 1, 3);
}
