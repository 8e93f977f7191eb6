// The tensor layouts of the artifact format (kiln.fbs TensorLayout): sizes, and conversions
// between row-major and BA16a64b2a, the blocked layout the engine's matrix kernels read. Plain,
// portable loops: the exporter converts once per tensor, and the engine only converts back when
// its CPU wants another layout (its own fast re-layout lives in engine/ops/matmul.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace kiln {

enum class TensorLayout : uint8_t { RowMajor = 0, BA16a64b2a = 1 };

const char* layout_name(TensorLayout layout);

// A tensor of shape `shape` viewed as `batch` matrices of K rows, stored in BA16a64b2a.
struct BlockedMatrices {
  int64_t batch = 1, K = 0, N = 0;
  int64_t Kp() const { return (K + 31) / 32 * 32; }
  int64_t Np() const { return (N + 63) / 64 * 64; }
  // Values stored per matrix and in all (padding included).
  int64_t matrix_values() const { return Kp() * Np(); }
  int64_t values() const { return batch * matrix_values(); }
};

// The blocked view of `numel` values as `batch` matrices of K rows, or nullopt when K or batch is
// not positive or they do not divide numel (or the padded size overflows).
std::optional<BlockedMatrices> blocked_view(uint64_t numel, int64_t K, int64_t batch);

// One row-major matrix w [K, N] into BA16a64b2a at out (m.matrix_values() values, padding zero).
void to_ba16a64b2a(const uint16_t* w, const BlockedMatrices& m, uint16_t* out);
// The inverse: one blocked matrix back to row-major [K, N].
void from_ba16a64b2a(const uint16_t* blocked, const BlockedMatrices& m, uint16_t* w);

}  // namespace kiln
