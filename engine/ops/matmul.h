// Matrix products on oneDNN: y[M, N] (f32) = x[M, K] (bf16) · W[K, N] (bf16).
//
// W is stored [in, out] row-major, the MaxText kernel layout, as it sits in the artifact. A Linear
// may re-lay W once at construction into the layout oneDNN's brgemm kernels want (measured in
// docs/performance.md); after construction forward() allocates nothing and creates no primitive.
#pragma once

#include <cstdint>
#include <memory>

namespace kiln::ops {

struct LinearOptions {
  int64_t max_m = 512;   // largest M forward() is called with
  bool relayout = true;  // allow a one-time re-layout of W for speed
};

class Linear {
 public:
  // `weights` must stay valid for the Linear's lifetime unless it re-laid them into its own memory.
  Linear(const uint16_t* weights, int64_t K, int64_t N, const LinearOptions& opt = {});
  ~Linear();
  Linear(Linear&&) noexcept;
  Linear& operator=(Linear&&) noexcept;

  int64_t K() const;
  int64_t N() const;

  // x: [M, K] bf16 row-major (lda = K); y: [M, N] f32 row-major (ldy = N). 1 ≤ M ≤ max_m.
  void forward(const uint16_t* x, int64_t M, float* y) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Number of threads oneDNN (OpenMP) uses; call before the first Linear is built.
void set_num_threads(int n);

}  // namespace kiln::ops
