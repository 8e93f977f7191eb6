// Small strided f32 × bf16 matrix products (Highway SIMD), next to the Linear GEMV/GEMM of
// engine/ops/matmul.h. None of them allocates.
#pragma once

#include <cstdint>

namespace kiln::ops {

// Small strided products for MLA's absorbed attention (engine/deepseek.cpp): per head, the query
// is mapped into the latent space through W_uk and the latent attention output back through W_uv,
// both slices of the artifact's wkv_b [Rkv, H, Dn + Dv] read in place (a row r of a head's slice
// is `dim` contiguous bf16 values at w + r · w_stride). Single-threaded (the caller spreads heads
// over threads); f32 accumulation, results NOT rounded (the caller rounds where MaxText would).
//   matmul_xwt: y[t, r] = Σ_d x[t·x_stride + d] · w[r·w_stride + d]      (y = x · Wᵀ, W [R, dim])
//   matmul_xw:  y[t, d] = Σ_r x[t·x_stride + r] · w[r·w_stride + d]      (y = x · W,  W [R, dim])
// for t < T, r < R, d < dim; y rows at y_stride. T, R, dim >= 1.
void matmul_xwt(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
                int64_t R, int64_t dim, float* y, int64_t y_stride);
void matmul_xw(const float* x, int64_t x_stride, int64_t T, const uint16_t* w, int64_t w_stride,
               int64_t R, int64_t dim, float* y, int64_t y_stride);

}  // namespace kiln::ops
