// Element-wise kernels on activations (Highway SIMD). All activations are f32 in memory; where
// MaxText rounds to bf16 (docs/maxtext.md §11) these kernels round too, so the engine follows
// MaxText's numerics. None of them allocates.
#pragma once

#include <cstdint>

#include "common/bf16.h"

namespace kiln::ops {

// log Σ exp(x[i]) over n ≥ 1 values (the normaliser of a row's log-softmax), vectorised; the
// same x gives the same result on any thread.
double log_sum_exp(const float* x, int64_t n);

// x[i] = bf16(x[i]) for n values: where MaxText holds a tensor in bf16 (a projection output).
// The scalar form of common/bf16.h stays visible beside it.
using kiln::round_to_bf16;
void round_to_bf16(float* x, int64_t n);

// x[i] = bf16(x[i] * s) for n values (query scale after RoPE, qwen3).
void scale_round(float* x, int64_t n, float s);

// out[i] = bf16(silu(bf16(gate[i])) * bf16(up[i])) for n values, written as bf16 (matmul input).
void silu_mul(const float* gate, const float* up, int64_t n, uint16_t* out);

// x[i] = bf16(x[i] + bf16(y[i])) — the residual add of a projection output, both in bf16 as in
// MaxText.
void add_round(float* x, const float* y, int64_t n);

// acc[i] += w · bf16(y[i]) for n values: one MoE expert's output (rounded to bf16, MaxText's
// expert output dtype) added with its routing weight into the f32 weighted sum
// (float32_weight_sum, docs/maxtext.md §2.7).
void add_weighted_bf16(float* acc, const float* y, float w, int64_t n);

// f32 → bf16 for a row block (e.g. attention output before the out-projection).
void to_bf16(const float* x, int64_t n, uint16_t* out);

// Name of the Highway target the kernels dispatch to on this CPU (e.g. "AVX3"), for logs.
const char* kernels_target_name();

}  // namespace kiln::ops
