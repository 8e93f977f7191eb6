// Micro-benchmark for kiln::ops::Linear on Llama-3.2-1B shapes.
//
//   bench_matmul [--threads N] [--shapes K,N;K,N...] [--ms 1,4,16] [--budget-ms 1500]
//                [--variants default,brgemm,gemv1,gemv16,plain,plainbrg,tdefault,tplain,tplainbrg]
//                [--gap-us 0]
//                [--quiet 0.15] [--max-wait-s 120]
//
// Variants: default (re-laid W, GEMV for M ≤ 16, brgemm above), brgemm (no GEMV), gemv1 and
// gemv16 (GEMV up to M = 1 / 16), plain (W in place), plainbrg (W in place, no GEMV), tdefault,
// tplain and tplainbrg (the same with W stored as [N, K]).
//
// The machine is shared and noisy, so variants run interleaved (one call of each in turn) and
// the report gives the median and the best call. Before each group the bench waits (up to
// --max-wait-s) until other processes use less than --quiet of the CPUs, and each line reports
// the share other processes took before / while it ran ("others"). W is cycled over enough copies
// (≥ 256 MiB) that every call streams its weights from memory, not from the 32 MiB L3, as in a
// real decode step. Run under OMP_WAIT_POLICY=active and without it: libgomp reads the variable
// when it loads. --gap-us inserts a busy pause on the calling thread between calls (the rest of a
// decode step), which is when passive OpenMP workers go to sleep and have to be woken.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "engine/ops/matmul.h"
#include "engine/ops/parallel.h"

namespace {

using Clock = std::chrono::steady_clock;

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

// Anonymous huge-page-advised memory holding the plain weight copies (as the loader would).
struct Region {
  void* p = nullptr;
  size_t len = 0;
  explicit Region(size_t bytes) : len(bytes) {
    p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw kiln::Error("mmap of " + std::to_string(bytes) + " bytes failed");
    madvise(p, len, MADV_HUGEPAGE);
  }
  ~Region() { munmap(p, len); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
};

// Machine state right now: read bandwidth and bf16 dot-product peak (both move a lot here).
__attribute__((target("avx512f"))) int64_t sum_range(const char* a, size_t begin, size_t end) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = begin; i < end; i += 256) {
    s0 = _mm512_add_epi64(s0, _mm512_load_si512(a + i));
    s1 = _mm512_add_epi64(s1, _mm512_load_si512(a + i + 64));
    s2 = _mm512_add_epi64(s2, _mm512_load_si512(a + i + 128));
    s3 = _mm512_add_epi64(s3, _mm512_load_si512(a + i + 192));
  }
  int64_t lanes[8];
  _mm512_storeu_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
  int64_t t = 0;
  for (int64_t l : lanes) t += l;
  return t;
}

double read_bandwidth_gbs(int threads) {
  const size_t n = size_t(512) << 20;
  Region r(n);
  std::memset(r.p, 1, n);
  const auto* a = static_cast<const char*>(r.p);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    std::atomic<int64_t> total{0};
    kiln::ops::run_team(threads, [&](int64_t ti, int64_t nti) {
      const size_t t = size_t(ti), nt = size_t(nti);
      const size_t chunk = n / 256 / nt * 256;
      total += sum_range(a, t * chunk, t + 1 == nt ? n : (t + 1) * chunk);
    });
    const double us = us_since(t0);
    if (total == 42) std::printf(" ");
    best = std::max(best, double(n) / us / 1e3);
  }
  return best;
}

__attribute__((target("avx512f,avx512bf16"))) float dot_peak_kernel(int64_t iters) {
  __m512 acc[12];
  for (auto& v : acc) v = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    asm volatile("" : "+v"(a), "+v"(b));
  }
  // Stored and summed by hand: GCC 12's _mm512_reduce_add_ps trips -Werror=uninitialized.
  float s = 0, lanes[16];
  for (auto& v : acc) {
    _mm512_storeu_ps(lanes, v);
    for (float l : lanes) s += l;
  }
  return s;
}

double dot_peak_gflops(int threads) {
  const int64_t iters = 20'000'000;
  const auto t0 = Clock::now();
  std::atomic<float> s{0};
  kiln::ops::run_team(threads, [&](int64_t, int64_t) { s += dot_peak_kernel(iters); });
  const double us = us_since(t0);
  if (s == 42) std::printf(" ");
  return double(threads) * double(iters) * 12 * 64 / us / 1e3;
}

// CPU time (in clock ticks) used by everyone, and by this process, so far.
struct CpuTicks {
  double total = 0, busy = 0, self = 0;
};

CpuTicks cpu_ticks() {
  CpuTicks t;
  std::ifstream stat("/proc/stat");
  std::string cpu;
  double v[10] = {};
  stat >> cpu;
  for (double& e : v) stat >> e;
  for (double e : v) t.total += e;
  t.busy = t.total - v[3] - v[4];  // minus idle and iowait
  std::ifstream self("/proc/self/stat");
  std::string line;
  std::getline(self, line);
  // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
  std::istringstream rest(line.substr(line.rfind(')') + 2));
  std::string f;
  for (int i = 3; i <= 15 && rest >> f; ++i)
    if (i == 14 || i == 15) t.self += std::stod(f);
  return t;
}

// Share of all CPUs used by other processes between two samples.
double others_share(const CpuTicks& a, const CpuTicks& b) {
  const double total = b.total - a.total;
  if (total <= 0) return 0;
  return std::max(0.0, (b.busy - a.busy) - (b.self - a.self)) / total;
}

// Waits until other processes leave the CPUs mostly idle; returns their last measured share.
double wait_for_quiet(double quiet, double max_wait_s) {
  const auto start = Clock::now();
  for (;;) {
    const CpuTicks a = cpu_ticks();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const double share = others_share(a, cpu_ticks());
    if (share <= quiet || us_since(start) > max_wait_s * 1e6) return share;
  }
}

struct Variant {
  std::string name;
  kiln::ops::LinearOptions opt;
};

Variant make_variant(const std::string& name) {
  Variant v{name, {}};
  if (name == "default") {
  } else if (name == "brgemm") {
    v.opt.gemv_max_m = 0;
  } else if (name == "gemv16") {
    v.opt.gemv_max_m = 16;
  } else if (name == "plain") {
    v.opt.relayout = false;
  } else if (name == "gemv1") {
    v.opt.gemv_max_m = 1;
  } else if (name == "plainbrg") {
    v.opt.relayout = false;
    v.opt.gemv_max_m = 0;
  } else if (name == "tplainbrg") {
    v.opt.relayout = false;
    v.opt.transposed = true;
    v.opt.gemv_max_m = 0;
  } else if (name == "tdefault") {  // W read as [N, K] (the bench's W is random either way)
    v.opt.transposed = true;
  } else if (name == "tplain") {
    v.opt.transposed = true;
    v.opt.relayout = false;
  } else {
    throw kiln::Error("unknown variant '" + name +
                      "' (default, brgemm, gemv1, gemv16, plain, plainbrg, tdefault, tplain, "
                      "tplainbrg)");
  }
  return v;
}

void busy_wait_us(double us) {
  const auto t0 = Clock::now();
  while (us_since(t0) < us) {
  }
}

int run(int argc, char** argv) {
  int threads = 2;
  std::string shapes_arg = "2048,2048;2048,512;2048,8192;8192,2048;2048,128256";
  std::string ms_arg = "1,4,16,128,512";
  std::string variants_arg = "default,brgemm,plain";
  double budget_ms = 1500, gap_us = 0, quiet = 0.15, max_wait_s = 120;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw kiln::Error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--threads")
      threads = std::stoi(next());
    else if (a == "--shapes")
      shapes_arg = next();
    else if (a == "--ms")
      ms_arg = next();
    else if (a == "--variants")
      variants_arg = next();
    else if (a == "--budget-ms")
      budget_ms = std::stod(next());
    else if (a == "--gap-us")
      gap_us = std::stod(next());
    else if (a == "--quiet")
      quiet = std::stod(next());
    else if (a == "--max-wait-s")
      max_wait_s = std::stod(next());
    else
      throw kiln::Error("unknown argument " + a);
  }
  const kiln::ops::ScopedThreadCount thread_count(threads);
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  std::printf("threads=%d OMP_WAIT_POLICY=%s gap=%.0fus\n", threads, wait ? wait : "(unset)",
              gap_us);
  std::printf("machine now: read %.1f GB/s, bf16 dot peak %.0f GFLOP/s\n",
              read_bandwidth_gbs(threads), dot_peak_gflops(threads));

  std::vector<int64_t> ms;
  for (const auto& s : split(ms_arg, ',')) ms.push_back(std::stoll(s));
  const int64_t max_m = *std::max_element(ms.begin(), ms.end());
  std::vector<Variant> variants;
  for (const auto& s : split(variants_arg, ',')) variants.push_back(make_variant(s));

  std::mt19937 rng(1);
  for (const auto& shape : split(shapes_arg, ';')) {
    const auto kn = split(shape, ',');
    const int64_t K = std::stoll(kn.at(0)), N = std::stoll(kn.at(1));
    const size_t wbytes = size_t(K * N) * 2;
    const size_t copies = std::max<size_t>(1, (size_t(256) << 20) / wbytes);
    // Random bf16 values in ±[0.5, 2): no denormals, no overflow in the sums.
    std::vector<uint16_t> one(size_t(K * N));
    for (auto& e : one) e = uint16_t((rng() & 0x8000u) | 0x3f00u | (rng() & 0x7fu));
    // Each variant gets its own copies of W (so one variant's call never finds W in the L3
    // after another's) and one Linear per copy; primitives are shared through the cache.
    std::vector<std::unique_ptr<Region>> plain;
    std::vector<std::vector<kiln::ops::Linear>> lin(variants.size());
    for (size_t v = 0; v < variants.size(); ++v) {
      plain.push_back(std::make_unique<Region>(copies * wbytes));
      auto* w = static_cast<uint16_t*>(plain.back()->p);
      for (size_t c = 0; c < copies; ++c) std::memcpy(w + c * K * N, one.data(), wbytes);
      variants[v].opt.max_m = max_m;
      const auto t0 = Clock::now();
      for (size_t c = 0; c < copies; ++c) lin[v].emplace_back(w + c * K * N, K, N, variants[v].opt);
      const double us = us_since(t0);
      std::printf("K=%ld N=%ld %-9s build %zu Linears: %.1f ms (%.2f ms each, %.2f GB/s of W)\n",
                  long(K), long(N), variants[v].name.c_str(), copies, us / 1e3,
                  us / 1e3 / double(copies), double(copies * wbytes) / us / 1e3);
    }
    std::vector<uint16_t> x(size_t(max_m * K));
    for (auto& e : x) e = uint16_t(0x3f00u | (rng() & 0x7fu));
    std::vector<float> y(size_t(max_m * N));
    for (int64_t M : ms) {
      const double flops = 2.0 * double(M) * double(K) * double(N);
      const double before = wait_for_quiet(quiet, max_wait_s);
      const CpuTicks ticks0 = cpu_ticks();
      // Rough cost of one round (one call per variant) from a warm-up round.
      const auto t0 = Clock::now();
      for (size_t v = 0; v < variants.size(); ++v) lin[v][0].forward(x.data(), M, y.data());
      const double round_us = std::max(1.0, us_since(t0));
      const int reps = std::clamp(int(budget_ms * 1e3 / round_us), 5, 2000);
      std::vector<std::vector<double>> t(variants.size());
      size_t c = 0;
      for (int r = 0; r < reps; ++r) {
        c = (c + 1) % copies;
        for (size_t v = 0; v < variants.size(); ++v) {
          if (gap_us > 0) busy_wait_us(gap_us);
          const auto s = Clock::now();
          lin[v][c].forward(x.data(), M, y.data());
          t[v].push_back(us_since(s));
        }
      }
      const double others = others_share(ticks0, cpu_ticks());
      for (size_t v = 0; v < variants.size(); ++v) {
        std::sort(t[v].begin(), t[v].end());
        const double med = t[v][t[v].size() / 2], best = t[v].front();
        std::printf(
            "thr=%d K=%5ld N=%6ld M=%3ld %-9s median %9.1f us %6.1f GB/s %6.1f GFLOP/s | "
            "best %9.1f us %6.1f GB/s %6.1f GFLOP/s (n=%d, others %2.0f%%/%2.0f%%)\n",
            threads, long(K), long(N), long(M), variants[v].name.c_str(), med,
            double(wbytes) / med / 1e3, flops / med / 1e3, best, double(wbytes) / best / 1e3,
            flops / best / 1e3, reps, before * 100, others * 100);
      }
      std::fflush(stdout);
    }
  }
  std::printf("machine now: read %.1f GB/s, bf16 dot peak %.0f GFLOP/s\n",
              read_bandwidth_gbs(threads), dot_peak_gflops(threads));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_matmul: %s\n", e.what());
    return 1;
  }
}
