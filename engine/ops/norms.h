// Normalisation kernels (Highway SIMD) on f32 activations, rounding to bf16 where MaxText does
// (docs/maxtext.md §11). None of them allocates.
#pragma once

#include <cstdint>

namespace kiln::ops {

// RMSNorm over each of `rows` rows of `dim` values: y = bf16(x · rsqrt(mean(x²) + eps)) · scale,
// the product rounded to bf16 (MaxText: normalised value cast to bf16, then × bf16 scale in bf16).
// Output as bf16 (matmul input) or as f32 holding bf16-representable values.
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              uint16_t* out);
void rms_norm(const float* x, const uint16_t* scale, int64_t rows, int64_t dim, float eps,
              float* out);

}  // namespace kiln::ops
