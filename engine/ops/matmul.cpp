// Linear: bf16 × bf16 → f32 matrix products for the per-token path.
//
// Design, from measurements on the project machine (2-core AMD EPYC VM, AVX-512 BF16, oneDNN
// 2.6.3; tools/dev/bench_matmul.cpp on Llama-3.2-1B shapes, W streamed from memory, medians of
// interleaved runs; the numbers are in the bench report):
//  - With weights described as format_tag::any, oneDNN picks brg:avx512_core_bf16 with W in the
//    blocked layout BA16a64b2a. At M ≥ 128 that runs at ~95% of the measured vdpbf16ps peak,
//    10–25% ahead of the same primitive on plain W and of runtime-M gemm:jit. So W is re-laid once.
//  - For small M, a plain AVX-512 BF16 loop over that blocked layout (each 64-column block is one
//    contiguous run of Kp×64 values, exactly a GEMV's access pattern) beats every oneDNN variant:
//    M = 1 streams W at the machine's read bandwidth (1.3–1.6× brgemm, 1.1–1.4× gemm:jit on plain
//    W); M = 2–4 is 1.2–2× brgemm; M = 6–16 is level with it (compute-bound from M ≈ 8). It serves
//    M ≤ 16 (gemv_blocked_range), so decode, batched or not, never enters oneDNN: no allocation.
//  - Static primitives need a fixed M, and runtime M falls back to gemm:jit on plain W, which is
//    0.5× at M ≈ 16 and mallocs 1–2 MB of packing buffers per call. So there is one static
//    primitive per M "bucket" (multiples of 16), and a call runs the largest bucket ≤ M plus the
//    GEMV for the rest (< 16 rows). The extra piece re-streams W once, small next to the compute
//    of ≥ 16 rows, and nothing past row M is read or written.
//  - W in place (relayout = false, [K, N] or transposed [N, K]): hand GEMVs for M ≤ 4 (about
//    0.8–0.9× the blocked GEMV at M = 1, 2× brgemm on plain W at M = 2–4; they keep decode free of
//    oneDNN and its allocations), brgemm buckets on plain W above (it copies W panels into the
//    scratchpad as it goes).
#include "engine/ops/matmul.h"

#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "engine/ops/parallel.h"
#include "schema/tensor_layout.h"

namespace kiln::ops {
namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

std::string shape_str(int64_t K, int64_t N) {
  return "Linear[K=" + std::to_string(K) + ", N=" + std::to_string(N) + "]";
}

// ---- memory for re-laid weights -----------------------------------------------------------------

// Anonymous memory, 2 MiB-aligned and advised for transparent huge pages: first-touch faults on
// 4 KiB pages cost ~13 µs each in this VM (≈7 s for a 1B model), 2 MiB pages cut them 512×, and
// huge pages also stream faster (~63 vs ~55 GB/s on 2 threads). Small matrices too: on 4 KiB
// pages (tried, to spare zeroing a whole 2 MiB page per matrix at start-up) the default model
// decoded 3x slower, ~1450 against ~4990 tokens/s.
class HugeBuffer {
 public:
  HugeBuffer() = default;
  explicit HugeBuffer(size_t bytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
    // Over-map by one huge page so an aligned start exists, then return the slack to the kernel.
    void* raw =
        mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
      throw Error("cannot allocate " + std::to_string(bytes) + " bytes for re-laid weights");
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHuge - 1) / kHuge * kHuge;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = start + len + kHuge;
    if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - aligned - len);
    data_ = reinterpret_cast<void*>(aligned);
    len_ = len;
    // Failure only means 4 KiB pages (THP off): slower to fault in, still correct. (Faulting the
    // huge pages in ahead with MADV_POPULATE_WRITE measured no faster than the copy's faults.)
    madvise(data_, len_, MADV_HUGEPAGE);
  }
  ~HugeBuffer() {
    if (data_) munmap(data_, len_);
  }
  HugeBuffer(HugeBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  HugeBuffer& operator=(HugeBuffer&& o) noexcept {
    if (this != &o) {
      if (data_) munmap(data_, len_);
      data_ = std::exchange(o.data_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;

  void* data() const { return data_; }
  bool empty() const { return data_ == nullptr; }

 private:
  void* data_ = nullptr;
  size_t len_ = 0;
};

// ---- process-wide oneDNN state ------------------------------------------------------------------

// One primitive for one row count, shared by every Linear of the same shape and by every thread:
// a oneDNN primitive may execute concurrently from several threads as long as each execution has
// its own scratchpad and memory objects, which a MatmulContext holds.
struct Bucket {
  int64_t m = 0;
  dnnl::memory::desc wmd;  // the weights layout it was built for
  dnnl::memory::desc src_md, dst_md;
  size_t scratch_bytes = 0;  // of oneDNN's scratchpad when it executes
  dnnl::primitive prim;
};

enum class Kind { kPlain, kBlocked };

struct BucketKey {
  int64_t K, N, M;
  Kind kind;
  bool transposed;  // plain W stored [N, K]
  int threads;
  auto tie() const { return std::tie(K, N, M, kind, transposed, threads); }
  bool operator<(const BucketKey& o) const { return tie() < o.tie(); }
};

struct Runtime {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  std::mutex mu;  // guards the cache and the default context; taken by constructors only
  // weak_ptr: primitives die with the last Linear (and context) of their shape.
  std::map<BucketKey, std::weak_ptr<const Bucket>> cache;
  // The weights layout brgemm wants per (K, N, M probed, threads): asking builds a primitive
  // descriptor (~0.1–0.3 ms), and a model has many Linears of few shapes (MoE experts).
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, dnnl::memory::desc> preferred;
};

Runtime& runtime() {
  static Runtime rt;
  return rt;
}

}  // namespace

// What executing primitives needs that two threads must not share. Grown by the constructors of
// the Linears built with it, never by forward().
struct MatmulContext::Impl {
  int64_t gemv_rows = std::numeric_limits<int64_t>::max();  // min over its Linears' gemv_max_m
  dnnl::stream strm{runtime().eng};
  BuildTimes build;
  // One user-mode scratchpad for every primitive of the context (its forward() calls never
  // overlap), also the plain GEMV's partial sums, so executing never makes oneDNN allocate.
  HugeBuffer scratch_buf;
  size_t scratch_size = 0;
  dnnl::memory scratch;
  // The src/dst memory objects of each primitive the context's Linears run: forward() only sets
  // their data handles. Holding the bucket keeps its primitive alive as long as the context.
  struct Bound {
    std::shared_ptr<const Bucket> bucket;
    dnnl::memory src, dst;
  };
  std::map<const Bucket*, Bound> bound;

  void reserve_scratch(size_t bytes) {
    bytes = std::max<size_t>(bytes, 4096);
    if (bytes <= scratch_size) return;
    HugeBuffer buf(bytes);
    // Fault the pages in now: first touch costs ~13 µs per 4 KiB here, ~6 ms for a 2 MiB page,
    // which would otherwise land on the first forward() that uses the scratchpad.
    std::memset(buf.data(), 0, bytes);
    scratch = dnnl::memory({{int64_t(bytes)}, dt::u8, tag::a}, runtime().eng, buf.data());
    scratch_buf = std::move(buf);
    scratch_size = bytes;
  }

  const Bound& bind(const std::shared_ptr<const Bucket>& b) {
    auto [it, inserted] = bound.try_emplace(b.get());
    if (inserted) {
      it->second.bucket = b;
      it->second.src = dnnl::memory(b->src_md, runtime().eng, DNNL_MEMORY_NONE);
      it->second.dst = dnnl::memory(b->dst_md, runtime().eng, DNNL_MEMORY_NONE);
    }
    return it->second;
  }
};

MatmulContext::MatmulContext() : impl_(std::make_unique<Impl>()) {}
MatmulContext::~MatmulContext() = default;
MatmulContext::BuildTimes MatmulContext::build_times() const {
  return impl_->build;
}

int64_t MatmulContext::gemv_rows() const {
  return impl_->gemv_rows == std::numeric_limits<int64_t>::max() ? 0 : impl_->gemv_rows;
}

namespace {

// The context of Linears built without one (tests and tools that run one thing at a time).
MatmulContext& default_context() {
  static MatmulContext ctx;
  return ctx;
}

// ---- the hand-written GEMV on BA16a64b2a ------------------------------------------------------

// The GEMV kernels are compiled for AVX-512 BF16 only; Linear uses them after a CPU check.
#define KILN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

KILN_AVX512BF16 inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// BA16a64b2a with a = K, b = N: for each block of 64 columns (outer, stride Kp·64), all K rows
// (padded to Kp, a multiple of 32) follow as pairs: pair p = rows 2p, 2p+1 is 64 columns × 2
// values = 128 bf16, column n's two values adjacent (row 2p in the low half). So one 64-column
// block is a contiguous Kp·128-byte stream and vdpbf16ps consumes it with x pairs broadcast.
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockK = 32;
constexpr int kRowsPerPass =
    6;  // 6 rows × 4 zmm accumulators + 4 weight zmm + x fit the 32 registers

bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// True if `md` is exactly the layout gemv_blocked() reads (so the GEMV and oneDNN agree on it).
bool is_ba16a64b2a(const dnnl::memory::desc& md, int64_t K, int64_t N) {
  const dnnl_memory_desc_t& d = md.data;
  if (d.ndims != 2 || d.data_type != dnnl_bf16 || d.format_kind != dnnl_blocked) return false;
  if (d.offset0 != 0) return false;
  const int64_t Kp = (K + kBlockK - 1) / kBlockK * kBlockK;
  const int64_t Np = (N + kBlockN - 1) / kBlockN * kBlockN;
  if (d.padded_dims[0] != Kp || d.padded_dims[1] != Np) return false;
  const auto& b = d.format_desc.blocking;
  return b.inner_nblks == 3 && b.inner_blks[0] == 16 && b.inner_idxs[0] == 0 &&
         b.inner_blks[1] == 64 && b.inner_idxs[1] == 1 && b.inner_blks[2] == 2 &&
         b.inner_idxs[2] == 0 && b.strides[0] == kBlockK * kBlockN && b.strides[1] == Kp * kBlockN;
}

// Row pairs [p0, p1) of W [K, N] (row-major) into BA16a64b2a at `out` (Kp·Np values; padding
// written as zeros). Element (k, n) goes to (n / 64)·Kp·64 + (k / 2)·128 + (n % 64)·2 + k % 2.
KILN_AVX512BF16 void relayout_pairs(const uint16_t* w, int64_t K, int64_t N, int64_t Kp,
                                    uint16_t* out, int64_t p0, int64_t p1) {
  // Interleave 16 columns of row a with the same 16 of row b: a0 b0 a1 b1 … a15 b15.
  alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                   37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                   53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                   27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* ra = 2 * p < K ? w + 2 * p * N : nullptr;
    const uint16_t* rb = 2 * p + 1 < K ? w + (2 * p + 1) * N : nullptr;
    for (int64_t nb = 0; nb < blocks; ++nb) {
      uint16_t* dst = out + nb * Kp * kBlockN + p * 2 * kBlockN;
      const int64_t n0 = nb * kBlockN, cols = std::min<int64_t>(kBlockN, N - n0);
      for (int half = 0; half < 2; ++half) {
        const __mmask32 m = mask32(cols - 32 * half);
        const __m512i a =
            ra ? _mm512_maskz_loadu_epi16(m, ra + n0 + 32 * half) : _mm512_setzero_si512();
        const __m512i b =
            rb ? _mm512_maskz_loadu_epi16(m, rb + n0 + 32 * half) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + 64 * half, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(dst + 64 * half + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }
}

// What oneDNN's reorder does for this pair of layouts, without its JIT compilation per shape
// (most of the default model's start-up) and with the rows split over the threads.
void relayout_to_ba16a64b2a(const uint16_t* w, int64_t K, int64_t N, int64_t Kp, uint16_t* out,
                            int threads, std::optional<uint32_t>* crc) {
  if (!crc) {
    run_spans(Kp / 2, 64, threads,
              [&](int64_t p0, int64_t p1) { relayout_pairs(w, K, N, Kp, out, p0, p1); });
    return;
  }
  // With the CRC-32C of W's bytes (the artifact's checksum, folded into this pass): each thread
  // checksums its contiguous band of rows a few row pairs at a time, right after re-laying them,
  // while they are still in its cache, so W is read from memory once; the bands' CRCs are then
  // joined in order.
  constexpr int kMaxBands = 64;
  constexpr int64_t kPairsPerStep = 8;  // 16 rows: ≤ 256 KiB of W at N = 8192, within L2
  const int bands = std::clamp(threads, 1, kMaxBands);
  const int64_t pairs = (K + 1) / 2;  // the pairs with rows of W (the rest is zero padding)
  uint32_t band_crc[kMaxBands];
  int64_t band_bytes[kMaxBands];
  const auto run_band = [&](int64_t t, int64_t nt) {
    const int64_t p0 = Kp / 2 * t / nt, p1 = Kp / 2 * (t + 1) / nt;
    uint32_t c = 0;
    int64_t bytes = 0;
    for (int64_t p = p0; p < p1; p += kPairsPerStep) {
      const int64_t e = std::min(p + kPairsPerStep, p1);
      relayout_pairs(w, K, N, Kp, out, p, e);
      const int64_t r0 = std::min(2 * p, K), r1 = std::min(2 * std::min(e, pairs), K);
      if (r1 > r0) {
        const size_t n = size_t((r1 - r0) * N) * sizeof(uint16_t);
        c = crc32c(w + r0 * N, n, c);
        bytes += int64_t(n);
      }
    }
    band_crc[t] = c;
    band_bytes[t] = bytes;
  };
  int used = 1;
  if (bands <= 1 || Kp / 2 < 64) {
    run_band(0, 1);
  } else {
    run_team(bands, [&](int64_t t, int64_t nt) {
      run_band(t, nt);
      if (t == 0) used = int(nt);
    });
  }
  uint32_t total = band_crc[0];
  for (int t = 1; t < used; ++t)
    total = crc32c_combine(total, band_crc[t], uint64_t(band_bytes[t]));
  *crc = total;
}

// R rows of x times the rows [k0, k1) of one 64-column block (a panel; k0 even), stored to y —
// or added to it when `accumulate` (a later panel of the same block). Meanwhile prefetches
// pf_lines cache lines at pf into L2 (see gemv_blocked_range).
template <int R>
KILN_AVX512BF16 inline void gemv_panel_rows(const uint16_t* x, int64_t ldx, int64_t k0, int64_t k1,
                                            const uint16_t* wb, float* y, int64_t ldy,
                                            int64_t ncols, bool accumulate, const char* pf,
                                            int64_t pf_lines) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t c = ncols - 16 * j;
      const __mmask16 mask = c >= 16 ? __mmask16(0xffff) : c <= 0 ? 0 : __mmask16((1u << c) - 1);
      acc[r][j] =
          accumulate ? _mm512_maskz_loadu_ps(mask, y + r * ldy + 16 * j) : _mm512_setzero_ps();
    }
  }
  const int64_t p0 = k0 / 2, p1 = k1 / 2;
  const int64_t pf_per_pair = p1 > p0 ? (pf_lines + (p1 - p0) - 1) / (p1 - p0) : 0;
  int64_t pf_next = 0;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = 0; i < pf_per_pair && pf_next < pf_lines; ++i, ++pf_next)
      _mm_prefetch(pf + pf_next * 64, _MM_HINT_T1);
    const uint16_t* w = wb + p * 2 * kBlockN;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    for (int r = 0; r < R; ++r) {
      uint32_t xp;
      std::memcpy(&xp, x + r * ldx + 2 * p, sizeof xp);  // x[2p] low, x[2p+1] high, as W's pairs
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
  if (k1 & 1) {
    // Last row alone: pair it with 0 rather than reading x past K (W's padding row is 0, but
    // x's next value could be anything, NaN included).
    const uint16_t* w = wb + p1 * 2 * kBlockN;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(uint32_t(x[r * ldx + k1 - 1])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) {
      const int64_t c = ncols - 16 * j;
      if (c <= 0) break;
      const __mmask16 mask = c >= 16 ? __mmask16(0xffff) : __mmask16((1u << c) - 1);
      _mm512_mask_storeu_ps(y + r * ldy + 16 * j, mask, acc[r][j]);
    }
  }
}

// Rows of W per panel: 2048 rows of a block are 256 KiB, so the panel being computed, the next
// one being prefetched and x (16 rows) fit in a 1 MiB L2 together.
constexpr int64_t kPanelK = 2048;

// Column blocks [nb0, nb1) of y[M, N] for all M rows.
//
// Rows go in passes of kRowsPerPass over one panel of a block at a time. The first pass streams
// the panel from memory; the later ones re-read it from L2 and are bound by arithmetic, so they
// prefetch the next panel into L2 and no pass waits on memory (M = 16 on the 1B shapes: 2048×8192
// +10–20 %, 2048×2048 +5–10 % in same-window runs). W taller than kPanelK (the MLP's down
// projection, K = 8192) is split into panels to keep that overlap.
KILN_AVX512BF16 void gemv_blocked_range(const uint16_t* x, int64_t M, int64_t K, int64_t N,
                                        int64_t Kp, const uint16_t* w, float* y, int64_t nb0,
                                        int64_t nb1) {
  const int64_t passes = (M + kRowsPerPass - 1) / kRowsPerPass;
  const int64_t panels = passes > 1 ? (K + kPanelK - 1) / kPanelK : 1;
  const int64_t panel_k = ((K + panels - 1) / panels + 1) / 2 * 2;  // even: panels start on a pair
  auto panel_lines = [&](int64_t k0) {  // cache lines of the panel starting at row k0
    return (std::min(K, k0 + panel_k) - k0 + 1) / 2 * 2 * kBlockN * int64_t(sizeof(uint16_t)) / 64;
  };
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wb = w + nb * Kp * kBlockN;
    const int64_t ncols = std::min(kBlockN, N - nb * kBlockN);
    float* yb = y + nb * kBlockN;
    for (int64_t k0 = 0; k0 < K; k0 += panel_k) {
      const int64_t k1 = std::min(K, k0 + panel_k);
      // The next panel: this block's, else the next block's first.
      const uint16_t* next = nullptr;
      int64_t next_lines = 0;
      if (passes > 1 && k1 < K) {
        next = wb + k1 * kBlockN;
        next_lines = panel_lines(k1);
      } else if (passes > 1 && nb + 1 < nb1) {
        next = wb + Kp * kBlockN;
        next_lines = panel_lines(0);
      }
      const int64_t lines_per_pass = passes > 1 ? (next_lines + passes - 2) / (passes - 1) : 0;
      for (int64_t m = 0, pass = 0; m < M; m += kRowsPerPass, ++pass) {
        const uint16_t* xm = x + m * K;
        float* ym = yb + m * N;
        const char* pf = nullptr;
        int64_t pf_lines = 0;
        if (next && pass > 0) {
          const int64_t first = (pass - 1) * lines_per_pass;
          pf = reinterpret_cast<const char*>(next) + first * 64;
          pf_lines = std::max<int64_t>(0, std::min(lines_per_pass, next_lines - first));
        }
        const bool acc = k0 > 0;
        switch (std::min<int64_t>(kRowsPerPass, M - m)) {
          case 1:
            gemv_panel_rows<1>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
          case 2:
            gemv_panel_rows<2>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
          case 3:
            gemv_panel_rows<3>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
          case 4:
            gemv_panel_rows<4>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
          case 5:
            gemv_panel_rows<5>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
          default:
            gemv_panel_rows<6>(xm, K, k0, k1, wb, ym, N, ncols, acc, pf, pf_lines);
            break;
        }
      }
    }
  }
}

// ---- the hand-written GEMV on plain W [K, N] (in place) -----------------------------------------

// Row-major W is read a block of 2·RB rows at a time across all N columns, so every row is one
// long contiguous run the prefetchers follow (a tile of columns over all K rows instead touches
// a few hundred bytes per 4 KiB page and streamed at ~0.7× the speed). The running sums live in
// y, which stays in cache. vdpbf16ps wants the two rows of a pair interleaved per column;
// vpermt2w does that in column order, so y needs no un-permuting.
//
// Adds rows [2·p0, 2·p0 + 2·RB) of W times x to y[r, c0..c1) for R rows of x; `first` stores
// instead of adding. `odd_tail` (RB = 1 only): the block is the single last row of an odd K.
template <int R, int RB>
KILN_AVX512BF16 void gemv_plain_block(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N,
                                      float* y, int64_t c0, int64_t c1, int64_t p0, bool first,
                                      bool odd_tail) {
  const __m512i lo_idx =
      _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx =
      _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                       22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  __m512bh xb[R][RB];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < RB; ++j) {
      uint32_t xp;
      if (odd_tail) {
        xp = x[r * K + K - 1];  // pairs with a zero row; x is not read past K
      } else {
        std::memcpy(&xp, x + r * K + 2 * (p0 + j), sizeof xp);  // x[2p] low, x[2p+1] high
      }
      xb[r][j] = (__m512bh)_mm512_set1_epi32(int(xp));
    }
  }
  const uint16_t* wb = w + 2 * p0 * N;
  for (int64_t col = c0; col < c1; col += 32) {
    const __mmask32 m = mask32(c1 - col);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) {
      if (first) {
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      } else {
        acc[r][0] = _mm512_maskz_loadu_ps(__mmask16(m), y + r * N + col);
        acc[r][1] = _mm512_maskz_loadu_ps(__mmask16(m >> 16), y + r * N + col + 16);
      }
    }
    for (int j = 0; j < RB; ++j) {
      const __m512i a = _mm512_maskz_loadu_epi16(m, wb + 2 * j * N + col);
      const __m512i b = odd_tail ? _mm512_setzero_si512()
                                 : _mm512_maskz_loadu_epi16(m, wb + (2 * j + 1) * N + col);
      const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(a, lo_idx, b);
      const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(a, hi_idx, b);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb[r][j], lo);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb[r][j], hi);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(y + r * N + col, __mmask16(m), acc[r][0]);
      _mm512_mask_storeu_ps(y + r * N + col + 16, __mmask16(m >> 16), acc[r][1]);
    }
  }
}

// Row pairs [q0, q1) of W (pair K/2 of an odd K is its last row alone) for R rows of x and
// columns [c0, c1): blocks of RB pairs, then single pairs. The first block stores, later add.
template <int R, int RB>
KILN_AVX512BF16 void gemv_plain_rows(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N,
                                     float* y, int64_t c0, int64_t c1, int64_t q0, int64_t q1) {
  const int64_t pairs = K / 2;
  const int64_t full_end = std::min(q1, pairs);
  bool first = true;
  int64_t q = q0;
  for (; q + RB <= full_end; q += RB, first = false)
    gemv_plain_block<R, RB>(x, K, w, N, y, c0, c1, q, first, false);
  for (; q < full_end; ++q, first = false)
    gemv_plain_block<R, 1>(x, K, w, N, y, c0, c1, q, first, false);
  if (q1 > pairs) gemv_plain_block<R, 1>(x, K, w, N, y, c0, c1, pairs, first, true);
}

// Row pairs [q0, q1) for all M rows of x and all N columns, in passes of ≤ 4 rows of x (each
// pass streams W again, which is why plain W serves only small M with the GEMV). RB keeps the x
// broadcasts and sums in registers.
KILN_AVX512BF16 void gemv_plain_range(const uint16_t* x, int64_t M, int64_t K, int64_t N,
                                      const uint16_t* w, float* y, int64_t q0, int64_t q1) {
  if (q0 >= q1) {  // no rows for this thread (tiny K): its share of the sum is zero
    std::memset(y, 0, size_t(M * N) * sizeof(float));
    return;
  }
  for (int64_t m = 0; m < M; m += 4) {
    const uint16_t* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 1:
        gemv_plain_rows<1, 8>(xm, K, w, N, ym, 0, N, q0, q1);
        break;
      case 2:
        gemv_plain_rows<2, 4>(xm, K, w, N, ym, 0, N, q0, q1);
        break;
      case 3:
        gemv_plain_rows<3, 2>(xm, K, w, N, ym, 0, N, q0, q1);
        break;
      default:
        gemv_plain_rows<4, 2>(xm, K, w, N, ym, 0, N, q0, q1);
        break;
    }
  }
}

// y[i] += Σ_t part[t·stride + i] for i in [b, e).
KILN_AVX512BF16 void add_partials(float* y, const float* part, int64_t parts, int64_t stride,
                                  int64_t b, int64_t e) {
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    __m512 acc = _mm512_loadu_ps(y + i);
    for (int64_t t = 0; t < parts; ++t)
      acc = _mm512_add_ps(acc, _mm512_loadu_ps(part + t * stride + i));
    _mm512_storeu_ps(y + i, acc);
  }
  for (; i < e; ++i)
    for (int64_t t = 0; t < parts; ++t) y[i] += part[t * stride + i];
}

// ---- the hand-written GEMV on transposed plain W [N, K] (in place) ------------------------------

// Sum of the 16 lanes. The masked shuffle forms (all lanes selected) are used because GCC 12's
// unmasked ones pass _mm512_undefined_ps() and trip -Werror=uninitialized.
KILN_AVX512BF16 inline float hsum(__m512 v) {
  constexpr __mmask16 kAll = 0xffff;
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0x4e));  // swap 256-bit halves
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0xb1));  // swap 128-bit pairs
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, 0x4e));        // swap 64-bit pairs
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, 0xb1));        // swap neighbours
  return _mm512_cvtss_f32(v);
}

// y[r, n0 + j] for R rows of x and RN consecutive rows of Wᵀ: plain dot products over K, both
// operands contiguous; masked loads zero the K tail on both sides.
template <int R, int RN>
KILN_AVX512BF16 void gemv_t_block(const uint16_t* x, int64_t K, const uint16_t* wt, float* y,
                                  int64_t ldy) {
  __m512 acc[R][RN];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < RN; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = mask32(K - k);
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * K + k);
    for (int j = 0; j < RN; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wt + j * K + k);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], wv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < RN; ++j) y[r * ldy + j] = hsum(acc[r][j]);
}

template <int R>
KILN_AVX512BF16 void gemv_t_rows(const uint16_t* x, int64_t K, int64_t N, const uint16_t* wt,
                                 float* y, int64_t n0, int64_t n1) {
  constexpr int RN = R == 1 ? 8 : 4;  // ≤ 16 accumulators
  int64_t n = n0;
  for (; n + RN <= n1; n += RN) gemv_t_block<R, RN>(x, K, wt + n * K, y + n, N);
  for (; n < n1; ++n) gemv_t_block<R, 1>(x, K, wt + n * K, y + n, N);
}

// Rows [n0, n1) of Wᵀ (outputs n0..n1-1) for all M rows of x, in passes of ≤ 4 rows; a block of
// RN rows of Wᵀ (RN·K·2 bytes) stays in L1/L2 between passes.
KILN_AVX512BF16 void gemv_t_range(const uint16_t* x, int64_t M, int64_t K, int64_t N,
                                  const uint16_t* wt, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t kSpan = 64;  // outputs per step, so passes over M reuse a cached W block
  for (int64_t n = n0; n < n1; n += kSpan) {
    const int64_t e = std::min(n1, n + kSpan);
    for (int64_t m = 0; m < M; m += 4) {
      const uint16_t* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(4, M - m)) {
        case 1:
          gemv_t_rows<1>(xm, K, N, wt, ym, n, e);
          break;
        case 2:
          gemv_t_rows<2>(xm, K, N, wt, ym, n, e);
          break;
        case 3:
          gemv_t_rows<3>(xm, K, N, wt, ym, n, e);
          break;
        default:
          gemv_t_rows<4>(xm, K, N, wt, ym, n, e);
          break;
      }
    }
  }
}

// ---- running the GEMVs on the OpenMP pool
// --------------------------------------------------------

// Below this many multiply-adds one thread does the whole product: waking a second OpenMP thread
// costs µs when it spins and up to ms when it sleeps (passive wait policy, other processes busy),
// while 256K MACs take ~10–20 µs on one core.
constexpr int64_t kMinParallelMacs = int64_t(1) << 18;

// Runs body(begin, end) over [0, units) (column blocks, 32-column chunks or output rows) on the
// threads, with work stealing (engine/ops/parallel.h); one thread below kMinParallelMacs.
template <typename Body>
void parallel_ranges(int64_t units, int64_t macs, int threads, const Body& body) {
  if (threads <= 1 || units == 1 || macs < kMinParallelMacs) {
    body(int64_t(0), units);
    return;
  }
  run_ranges_stealing(units, threads, body);
}

enum class Gemv { kNone, kBlocked, kPlain, kTransposed };

// Floats of scratch the plain-W GEMV needs for its per-thread partial sums.
int64_t plain_gemv_scratch(int threads, int64_t max_rows, int64_t N) {
  return int64_t(std::max(threads - 1, 0)) * max_rows * N;
}

// `bands`: the threads the Linear was built for; `threads` (≤ bands) the ones this call runs on.
// `partial`: plain_gemv_scratch(bands, M, N) floats (plain W only).
void gemv(Gemv kind, const uint16_t* x, int64_t M, int64_t K, int64_t N, int64_t Kp,
          const uint16_t* w, float* y, int bands, int threads, float* partial) {
  const int64_t macs = M * K * N;
  switch (kind) {
    case Gemv::kBlocked:
      parallel_ranges((N + kBlockN - 1) / kBlockN, macs, threads, [&](int64_t b, int64_t e) {
        gemv_blocked_range(x, M, K, N, Kp, w, y, b, e);
      });
      break;
    case Gemv::kPlain: {
      // Row-major W splits by rows: each band of rows is one contiguous part of W, summed into y
      // (band 0) or a partial buffer, and the partial sums are added once at the end (split by
      // columns, each thread reads part of every row: ~10% slower on the 1B shapes). The bands
      // are the Linear's thread count whatever this call runs on, so the sums, and the results,
      // do not depend on how many threads a step gets (engine/thread_governor.h).
      const int64_t pairs = (K + 1) / 2;
      if (bands <= 1 || pairs == 1 || macs < kMinParallelMacs) {
        gemv_plain_range(x, M, K, N, w, y, 0, pairs);
        break;
      }
      const auto band = [&](int64_t b) {
        float* out = b == 0 ? y : partial + (b - 1) * M * N;
        gemv_plain_range(x, M, K, N, w, out, pairs * b / bands, pairs * (b + 1) / bands);
      };
      if (threads <= 1) {
        for (int64_t b = 0; b < bands; ++b) band(b);
        add_partials(y, partial, bands - 1, M * N, 0, M * N);
        break;
      }
      run_team(threads, [&](int64_t t, int64_t nt) {
        for (int64_t b = t; b < bands; b += nt) band(b);
        team_barrier();
        add_partials(y, partial, bands - 1, M * N, M * N * t / nt, M * N * (t + 1) / nt);
      });
      break;
    }
    case Gemv::kTransposed:
      parallel_ranges(N, macs, threads,
                      [&](int64_t b, int64_t e) { gemv_t_range(x, M, K, N, w, y, b, e); });
      break;
    case Gemv::kNone:
      break;
  }
}

// ---- primitive construction ---------------------------------------------------------------------

// W[K, N] as stored: row-major [K, N], or transposed = row-major [N, K] (oneDNN's "ba").
dnnl::memory::desc plain_weights_md(int64_t K, int64_t N, bool transposed) {
  return {{K, N}, dt::bf16, transposed ? tag::ba : tag::ab};
}

dnnl::primitive_attr user_scratchpad_attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Builds (or finds) the primitive for M rows. Caller holds rt.mu.
std::shared_ptr<const Bucket> get_bucket(Runtime& rt, int64_t K, int64_t N, int64_t M, Kind kind,
                                         bool transposed, const dnnl::memory::desc& wmd,
                                         int threads) {
  const BucketKey key{K, N, M, kind, kind != Kind::kBlocked && transposed, threads};
  auto hit = rt.cache[key].lock();
  // The blocked layout is oneDNN's choice; should it ever differ between two Linears of one
  // shape, the later one gets a private primitive rather than one built for another layout.
  if (hit && hit->wmd == wmd) return hit;
  auto b = std::make_shared<Bucket>();
  b->m = M;
  b->wmd = wmd;
  try {
    const dnnl::memory::desc src_md({M, K}, dt::bf16, tag::ab), dst_md({M, N}, dt::f32, tag::ab);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wmd, dst_md),
                                          user_scratchpad_attr(), rt.eng);
    b->scratch_bytes = pd.scratchpad_desc().get_size();
    b->prim = dnnl::matmul(pd);
    b->src_md = src_md;
    b->dst_md = dst_md;
  } catch (const dnnl::error& e) {
    throw Error(shape_str(K, N) + ": oneDNN cannot build a bf16 matmul for M=" + std::to_string(M) +
                ": " + e.what());
  }
  if (!hit) rt.cache[key] = b;
  return b;
}

// Row counts that get their own primitive: every M ≤ 16 (decode batches) the GEMV does not serve,
// multiples of 16 up to 512 (prefill chunks; brgemm runs full speed on them), multiples of 128
// beyond. A call with any other M splits into the largest bucket ≤ M plus the rest, so at most ~3
// pieces. 16 is always a bucket, so with gemv_max_m ≤ 16 every M > gemv_max_m has a bucket ≤ M.
std::vector<int64_t> bucket_sizes(int64_t max_m, int64_t gemv_max_m) {
  std::vector<int64_t> s;
  for (int64_t m = 1; m <= std::min<int64_t>(16, max_m); ++m)
    if (m > gemv_max_m || m == 16) s.push_back(m);
  for (int64_t m = 32; m <= std::min<int64_t>(512, max_m); m += 16) s.push_back(m);
  for (int64_t m = 640; m <= max_m; m += 128) s.push_back(m);
  return s;
}

// Rows served by the hand GEMVs by default. On re-laid W, measured against brgemm on the same W,
// the GEMV was ahead at every M from 1 to 16 (1.3–1.6× at M = 1, 1.2–2× at M = 2–4, ≈ 1.08× at
// M = 16 with 6-row passes). On plain W it beats both brgemm and gemm:jit at every M ≤ 16 too
// (bench report).
constexpr int64_t kDefaultGemvMaxM = 16;
// On W in place (plain or transposed) the GEMVs stream W once per 4 rows of x, so they win only
// at small M: ahead of brgemm on the same W at M ≤ 4, behind from M ≈ 8 (bench report).
constexpr int64_t kDefaultPlainGemvMaxM = 4;
constexpr int64_t kMaxGemvM = 16;  // bucket_sizes() relies on it

}  // namespace

// ---- Linear -------------------------------------------------------------------------------------

struct Linear::Impl {
  int64_t K = 0, N = 0, max_m = 0;
  int threads = 1;
  HugeBuffer owned;                     // re-laid W (empty when W is used in place)
  std::optional<uint32_t> weights_crc;  // CRC-32C of the caller's W, if the re-layout computed it
  const uint16_t* w = nullptr;          // the W forward() reads: owned.data() or the caller's
  int64_t Kp = 0;                       // K padded to the blocked layout's 32 (blocked W only)
  Gemv gemv_kind = Gemv::kNone;         // which hand GEMV reads w
  int64_t gemv_max_m = 0;               // rows the hand GEMV serves (0: none)
  dnnl::memory wmem;                    // W as oneDNN sees it; handle set once here, never again
  MatmulContext::Impl* ctx = nullptr;   // the context forward() runs in
  using Bound = MatmulContext::Impl::Bound;
  // The buckets (ascending m) and, for each, its primitive bound in ctx: built at construction up
  // to eager_max_m, the others by the first forward() that needs them (see LinearOptions).
  std::vector<int64_t> bucket_m;
  mutable std::vector<const Bound*> bound;
  std::vector<int32_t> largest_le;  // [M] → index of the largest bucket with m ≤ M (M ≤ max_m)
  Kind kind = Kind::kPlain;
  bool transposed = false;
  dnnl::memory::desc wmd;

  const Bound& bucket(size_t i) const {
    if (bound[i] == nullptr) {
      Runtime& rt = runtime();
      std::lock_guard<std::mutex> lock(rt.mu);
      const double t0 = now_seconds();
      const auto b = get_bucket(rt, K, N, bucket_m[i], kind, transposed, wmd, threads);
      ctx->reserve_scratch(b->scratch_bytes);
      bound[i] = &ctx->bind(b);
      ctx->build.primitive_seconds += now_seconds() - t0;
    }
    return *bound[i];
  }

  void run(const Bound& b, const uint16_t* x, float* y) const {
    // dnnl::memory::set_data_handle on plain layouts only stores the pointer; the C execute API
    // takes a stack array, where the C++ wrapper would build a std::vector/unordered_map.
    b.src.set_data_handle(const_cast<uint16_t*>(x));
    b.dst.set_data_handle(y);
    dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, b.src.get()},
                              {DNNL_ARG_WEIGHTS, wmem.get()},
                              {DNNL_ARG_DST, b.dst.get()},
                              {DNNL_ARG_SCRATCHPAD, ctx->scratch.get()}};
    if (dnnl_primitive_execute(b.bucket->prim.get(), ctx->strm.get(), 4, args) != dnnl_success)
      throw Error(shape_str(K, N) + ": oneDNN matmul failed for M=" + std::to_string(b.bucket->m));
  }
};

Linear::Linear(const uint16_t* weights, int64_t K, int64_t N, const LinearOptions& opt) {
  if (weights == nullptr) throw Error(shape_str(K, N) + ": weights pointer is null");
  if (K < 1 || N < 1) throw Error(shape_str(K, N) + ": K and N must be ≥ 1");
  if (opt.max_m < 1)
    throw Error(shape_str(K, N) + ": max_m must be ≥ 1, got " + std::to_string(opt.max_m));
  if (opt.gemv_max_m < -1)
    throw Error(shape_str(K, N) + ": gemv_max_m must be ≥ -1, got " +
                std::to_string(opt.gemv_max_m));

  auto impl = std::make_unique<Impl>();
  impl->K = K;
  impl->N = N;
  impl->max_m = opt.max_m;
  impl->threads = max_threads();
  impl->w = weights;

  Runtime& rt = runtime();
  std::lock_guard<std::mutex> lock(rt.mu);
  MatmulContext::Impl& ctx = *(opt.context ? opt.context : &default_context())->impl_;
  impl->ctx = &ctx;
  try {
    const dnnl::memory::desc plain = plain_weights_md(K, N, opt.transposed);
    dnnl::memory::desc wmd = plain;
    Kind kind = Kind::kPlain;
    // Ask brgemm which layout it wants at the largest M (the compute-bound case); every bucket is
    // then built with that same layout, so one copy of W serves them all.
    const auto preferred_layout = [&] {
      const int64_t probe_m = std::min<int64_t>(opt.max_m, 512);
      const auto key = std::make_tuple(K, N, probe_m, impl->threads);
      if (auto it = rt.preferred.find(key); it != rt.preferred.end()) return it->second;
      const dnnl::memory::desc src_md({probe_m, K}, dt::bf16, tag::ab);
      const dnnl::memory::desc dst_md({probe_m, N}, dt::f32, tag::ab);
      const dnnl::memory::desc any({K, N}, dt::bf16, tag::any);
      const dnnl::memory::desc want =
          dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_md, any, dst_md),
                                       user_scratchpad_attr(), rt.eng)
              .weights_desc();
      rt.preferred.emplace(key, want);
      return want;
    };
    bool in_place_blocked = false;
    HugeBuffer unblocked;  // blocked weights this CPU wants otherwise, back in row-major order
    if (opt.weights_blocked) {
      // Stored by the exporter in BA16a64b2a: used in place when that is the layout this CPU's
      // kernels want (no re-layout, no copy: the mapping is the weights), else turned back into
      // row-major memory the Linear owns and taken from there like any row-major W.
      if (opt.transposed) throw Error(shape_str(K, N) + ": blocked weights cannot be transposed");
      const BlockedMatrices m{1, K, N};
      const dnnl::memory::desc want = preferred_layout();
      if (cpu_has_avx512_bf16() && is_ba16a64b2a(want, K, N) &&
          want.data.padded_dims[0] == m.Kp() && want.data.padded_dims[1] == m.Np()) {
        in_place_blocked = true;
        wmd = want;
        kind = Kind::kBlocked;
        impl->Kp = m.Kp();
        impl->gemv_kind = Gemv::kBlocked;
      } else {
        const double t0 = now_seconds();
        unblocked = HugeBuffer(size_t(K * N) * sizeof(uint16_t));
        from_ba16a64b2a(weights, m, static_cast<uint16_t*>(unblocked.data()));
        weights = impl->w = static_cast<const uint16_t*>(unblocked.data());
        ctx.build.relayout_seconds += now_seconds() - t0;
      }
    }
    if (opt.relayout && !in_place_blocked) {
      const dnnl::memory::desc want = preferred_layout();
      if (want != plain) {
        wmd = want;
        kind = Kind::kBlocked;
        const double t0 = now_seconds();  // the memory's first touch is part of the re-layout
        impl->owned = HugeBuffer(wmd.get_size());
        // oneDNN's reorder writes the layout's zero padding too (Kp, Np), which the GEMV and
        // brgemm rely on; the fresh anonymous pages are zero anyway. From a transposed W it
        // transposes and blocks in the same pass.
        if (!opt.transposed && is_ba16a64b2a(wmd, K, N) && cpu_has_avx512_bf16()) {
          relayout_to_ba16a64b2a(
              weights, K, N, wmd.data.padded_dims[0], static_cast<uint16_t*>(impl->owned.data()),
              impl->threads,
              opt.checksum_weights && !opt.weights_blocked ? &impl->weights_crc : nullptr);
        } else {
          dnnl::memory src(plain, rt.eng, const_cast<uint16_t*>(weights));
          dnnl::memory dst(wmd, rt.eng, impl->owned.data());
          dnnl::reorder(src, dst).execute(ctx.strm, src, dst);
          ctx.strm.wait();
        }
        ctx.build.relayout_seconds += now_seconds() - t0;
        impl->w = static_cast<const uint16_t*>(impl->owned.data());
        if (is_ba16a64b2a(wmd, K, N)) {
          impl->Kp = wmd.data.padded_dims[0];
          impl->gemv_kind = Gemv::kBlocked;
        }
      }
    }
    if (kind == Kind::kPlain && !unblocked.empty()) impl->owned = std::move(unblocked);
    if (kind == Kind::kPlain) impl->gemv_kind = opt.transposed ? Gemv::kTransposed : Gemv::kPlain;
    if (!cpu_has_avx512_bf16()) impl->gemv_kind = Gemv::kNone;
    if (impl->gemv_kind != Gemv::kNone) {
      const int64_t def =
          impl->gemv_kind == Gemv::kBlocked ? kDefaultGemvMaxM : kDefaultPlainGemvMaxM;
      impl->gemv_max_m =
          std::min({opt.max_m, kMaxGemvM, opt.gemv_max_m < 0 ? def : opt.gemv_max_m});
    }
    ctx.gemv_rows = std::min(ctx.gemv_rows, impl->gemv_max_m);
    if (impl->gemv_kind == Gemv::kPlain) {
      ctx.reserve_scratch(size_t(plain_gemv_scratch(impl->threads, impl->gemv_max_m, N)) *
                          sizeof(float));
    }
    impl->wmem = dnnl::memory(wmd, rt.eng, const_cast<uint16_t*>(impl->w));
    impl->kind = kind;
    impl->transposed = opt.transposed;
    impl->wmd = wmd;

    impl->bucket_m = bucket_sizes(opt.max_m, impl->gemv_max_m);
    impl->bound.assign(impl->bucket_m.size(), nullptr);
    impl->largest_le.assign(size_t(opt.max_m) + 1, -1);
    size_t next = 0;
    for (int64_t m = 1; m <= opt.max_m; ++m) {
      while (next < impl->bucket_m.size() && impl->bucket_m[next] <= m) ++next;
      impl->largest_le[size_t(m)] = int32_t(next) - 1;
    }
    const double t0 = now_seconds();
    for (size_t i = 0; i < impl->bucket_m.size(); ++i) {
      if (impl->bucket_m[i] > opt.eager_max_m) break;
      const auto b =
          get_bucket(rt, K, N, impl->bucket_m[i], kind, opt.transposed, wmd, impl->threads);
      ctx.reserve_scratch(b->scratch_bytes);
      impl->bound[i] = &ctx.bind(b);
    }
    ctx.build.primitive_seconds += now_seconds() - t0;
  } catch (const dnnl::error& e) {
    throw Error(shape_str(K, N) + ": oneDNN failed while preparing the weights: " + e.what());
  }
  impl_ = std::move(impl);
}

Linear::~Linear() = default;
Linear::Linear(Linear&&) noexcept = default;
Linear& Linear::operator=(Linear&&) noexcept = default;

int64_t Linear::K() const {
  return impl_ ? impl_->K : 0;
}
int64_t Linear::N() const {
  return impl_ ? impl_->N : 0;
}
std::optional<uint32_t> Linear::weights_crc32c() const {
  return impl_ ? impl_->weights_crc : std::nullopt;
}

int64_t Linear::max_m() const {
  return impl_ ? impl_->max_m : 0;
}
bool Linear::owns_weights() const {
  return impl_ && !impl_->owned.empty();
}

void Linear::check_call(const uint16_t* x, int64_t M, const float* y) const {
  if (!impl_) throw Error("Linear::forward on a moved-from Linear");
  const Impl& im = *impl_;
  if (M < 1 || M > im.max_m)
    throw Error(shape_str(im.K, im.N) + ": forward with M=" + std::to_string(M) +
                ", expected 1 ≤ M ≤ max_m=" + std::to_string(im.max_m));
  if (x == nullptr || y == nullptr) throw Error(shape_str(im.K, im.N) + ": null x or y");
}

void Linear::forward(const uint16_t* x, int64_t M, float* y) const {
  check_call(x, M, y);
  const Impl& im = *impl_;
  while (M > 0) {
    if (M <= im.gemv_max_m) {
      gemv(im.gemv_kind, x, M, im.K, im.N, im.Kp, im.w, y, im.threads,
           std::min(im.threads, max_threads()), static_cast<float*>(im.ctx->scratch_buf.data()));
      return;
    }
    const Impl::Bound& b = im.bucket(size_t(im.largest_le[size_t(M)]));
    im.run(b, x, y);
    x += b.bucket->m * im.K;
    y += b.bucket->m * im.N;
    M -= b.bucket->m;
  }
}

// The calls' column blocks are numbered one after the other, so one work-stealing pass covers
// them all; each block is computed exactly as Linear::forward would (the same kernel over the
// same rows), so the results do not depend on the grouping or on which thread takes a block.
void forward_together(std::span<const LinearCall> calls) {
  constexpr size_t kMaxCalls = 64;  // per pass: the unit table lives on the stack
  if (calls.empty()) return;
  if (calls.size() > kMaxCalls) {
    for (size_t at = 0; at < calls.size(); at += kMaxCalls)
      forward_together(calls.subspan(at, std::min(kMaxCalls, calls.size() - at)));
    return;
  }
  bool shared_pass = true;
  for (const LinearCall& c : calls) {
    if (c.linear == nullptr) throw Error("forward_together: a call has no Linear");
    c.linear->check_call(c.x, c.M, c.y);
    const Linear::Impl& im = *c.linear->impl_;
    shared_pass = shared_pass && im.gemv_kind == Gemv::kBlocked && c.M <= im.gemv_max_m;
  }
  if (!shared_pass || calls.size() == 1) {
    for (const LinearCall& c : calls) c.linear->forward(c.x, c.M, c.y);
    return;
  }
  int64_t first_unit[kMaxCalls + 1];
  first_unit[0] = 0;
  int64_t macs = 0;
  int threads = max_threads();
  for (size_t i = 0; i < calls.size(); ++i) {
    const Linear::Impl& im = *calls[i].linear->impl_;
    first_unit[i + 1] = first_unit[i] + (im.N + kBlockN - 1) / kBlockN;
    macs += calls[i].M * im.K * im.N;
    threads = std::min(threads, im.threads);
  }
  parallel_ranges(first_unit[calls.size()], macs, threads, [&](int64_t b, int64_t e) {
    size_t i = size_t(std::upper_bound(first_unit, first_unit + calls.size(), b) - first_unit) - 1;
    for (; i < calls.size() && first_unit[i] < e; ++i) {
      const LinearCall& c = calls[i];
      const Linear::Impl& im = *c.linear->impl_;
      gemv_blocked_range(c.x, c.M, im.K, im.N, im.Kp, im.w, c.y,
                         std::max(b, first_unit[i]) - first_unit[i],
                         std::min(e, first_unit[i + 1]) - first_unit[i]);
    }
  });
}

}  // namespace kiln::ops
