// Matrix products on oneDNN: y[M, N] (f32) = x[M, K] (bf16) · W[K, N] (bf16).
//
// W is stored [in, out] row-major, the MaxText kernel layout, as it sits in the artifact. A Linear
// may re-lay W once at construction into the layout oneDNN's brgemm kernels want (measured in
// docs/performance.md). forward() does no I/O, and creates a primitive (once) only for a row
// count above LinearOptions::eager_max_m.
//
// How a Linear computes (see matmul.cpp for the measurements behind each choice):
//  - relayout = true on a CPU with AVX-512 BF16: W is copied once into oneDNN's blocked layout
//    (BA16a64b2a) in 2 MiB-aligned, huge-page-advised memory the Linear owns. M ≤ 16 rows go
//    through a hand-written AVX-512 BF16 GEMV that streams that layout (it beats oneDNN there);
//    larger M through static brgemm primitives, one per "bucket" row count.
//  - relayout = false: W is used in place, only read. M ≤ 4 through hand GEMVs on the plain (or
//    transposed) layout, larger M through brgemm bucket primitives on plain W.
//  Buckets are multiples of 16 up to 512 (of 128 beyond), plus every M ≤ 16 no GEMV serves. A
//  call with an M that is not a bucket runs the largest bucket ≤ M, then the rest, so x and y are
//  never read or written past row M. Bucket primitives are shared process-wide by all Linears of
//  one shape. The GEMV paths allocate nothing; a oneDNN execute allocates a small argument map.
//
// Threading contract: what two concurrent forward() calls must not share (a oneDNN stream, the
// scratchpad, the memory objects bound to x and y) lives in a MatmulContext. Linears built with
// the same context must not run forward() at the same time, nor be constructed while one of them
// does; Linears with different contexts may run and be constructed concurrently (each engine owns
// one context, so engines run side by side). Primitives are shared process-wide between Linears of
// one shape and thread count, which oneDNN allows for concurrent execution.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>

namespace kiln::ops {

// The per-engine execution state of Linears (see the threading contract above). Not copyable or
// movable: Linears keep a pointer to it, so it must outlive them.
class MatmulContext {
 public:
  MatmulContext();
  ~MatmulContext();
  MatmulContext(const MatmulContext&) = delete;
  MatmulContext& operator=(const MatmulContext&) = delete;

  // What building this context's Linears has cost so far (start-up phases): copying weights into
  // oneDNN's layout, and creating oneDNN primitives (or finding them in the process-wide cache).
  struct BuildTimes {
    double relayout_seconds = 0;
    double primitive_seconds = 0;
  };
  BuildTimes build_times() const;
  // The most rows every Linear of this context serves with its hand-written GEMV (0: some
  // Linear has none): passes up to that many rows split their work the same way on any number
  // of threads (the thread governor, engine/thread_governor.h, changes only those).
  int64_t gemv_rows() const;

 private:
  friend class Linear;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct LinearOptions {
  int64_t max_m = 512;   // largest M forward() is called with
  bool relayout = true;  // allow a one-time re-layout of W for speed
  // W is stored transposed, row-major [N, K] (e.g. a tied embedding [vocab, dim] used as the
  // output head): no separate transpose needed; a re-layout reads it directly, and in place it
  // is used as is (oneDNN handles the transposed layout).
  bool transposed = false;
  // Largest M served by the hand-written GEMVs; -1 picks the measured default (16 on re-laid W,
  // 4 on W in place), 0 disables them, values above 16 act as 16 (tuning / benchmarking knob).
  int64_t gemv_max_m = -1;
  // Where forward() runs; must outlive the Linear. nullptr: a process-wide default context, for
  // programs that run one Linear at a time (tests, benchmarks).
  MatmulContext* context = nullptr;
  // The oneDNN primitives for row counts up to eager_max_m are created with the Linear; the
  // others (prefill chunks) by the first forward() that runs that many rows, so a process that
  // only decodes never pays for them (each costs ~0.1–0.4 ms). A forward() with M ≤ eager_max_m
  // never creates one, and so never allocates: set it to the largest batch of the per-token path.
  int64_t eager_max_m = 512;
  // Compute the CRC-32C of W's bytes (as given, K·N bf16 values) in the re-layout pass, which
  // reads them anyway (an artifact's checksum at no extra read: engine/model.cpp). Only the
  // hand-written re-layout does; weights_crc32c() then returns it.
  bool checksum_weights = false;
  // `weights` are stored in BA16a64b2a (schema/tensor_layout.h: K padded to a multiple of 32, N
  // to 64), as `kiln export --weights-layout blocked` writes them: used in place when this CPU's
  // kernels want that layout, else converted back to row-major once. Not with `transposed`.
  bool weights_blocked = false;
};

class Linear;

// One product of forward_together(): y[M, N] = x[M, K] · W, as linear->forward(x, M, y).
struct LinearCall {
  const Linear* linear;
  const uint16_t* x;
  int64_t M;
  float* y;
};

// Runs every call, with the same results (bits) as calling forward() on each in turn. When every
// call is served by the hand GEMV on blocked W (decode rows), they share one pass over the
// threads: one wake-up, one barrier and one tail instead of one each. That is what the q/k/v and
// gate/up projections of a decode step, or a MoE layer's experts, need: in a 1B decode step the
// separate products cost 7 regions per layer. The calls' Linears must share one MatmulContext;
// the y's must not overlap each other or any x. Allocates nothing.
void forward_together(std::span<const LinearCall> calls);

class Linear {
 public:
  // `weights` ([K, N] row-major, or [N, K] with opt.transposed) must stay valid for the Linear's
  // lifetime unless it re-laid them into its own memory (owns_weights(): the caller may then free
  // them). Weights used in place are only read, so they may be a read-only mapping.
  // Throws kiln::Error on bad shapes or when oneDNN cannot build a primitive. Cost: the first
  // Linear of the process initialises oneDNN (~2–12 ms); each new shape creates its primitives
  // (~0.1–0.4 ms each, ~30–45 per shape at max_m = 512); a re-layout is one pass over W (~10 GB/s)
  // plus first-touch faults on the new memory, which dominate in this VM (see the bench report).
  Linear(const uint16_t* weights, int64_t K, int64_t N, const LinearOptions& opt = {});
  ~Linear();
  Linear(Linear&&) noexcept;
  Linear& operator=(Linear&&) noexcept;

  // A moved-from Linear reports K() == N() == 0 and throws from forward().
  int64_t K() const;
  int64_t N() const;
  int64_t max_m() const;
  // True when W was re-laid into memory the Linear owns (the caller's weights are then unused).
  bool owns_weights() const;
  // With LinearOptions::checksum_weights: the CRC-32C of the caller's W when the re-layout
  // computed it; empty when W was used in place or re-laid by oneDNN (the caller checks it).
  std::optional<uint32_t> weights_crc32c() const;

  // x: [M, K] bf16 row-major (lda = K); y: [M, N] f32 row-major (ldy = N). 1 ≤ M ≤ max_m, else
  // kiln::Error. Reads exactly M rows of x and writes exactly M rows of y (y must not overlap x);
  // no alignment needed. Allocates nothing on the GEMV paths (M ≤ 16 re-laid, M ≤ 4 in place);
  // above them oneDNN's execute allocates a small argument map (6 mallocs, ~4 KB) per call.
  void forward(const uint16_t* x, int64_t M, float* y) const;

 private:
  friend void forward_together(std::span<const LinearCall> calls);
  void check_call(const uint16_t* x, int64_t M, const float* y) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln::ops
