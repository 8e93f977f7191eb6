#include "schema/tensor_layout.h"

#include <algorithm>

namespace kiln {

const char* layout_name(TensorLayout layout) {
  switch (layout) {
    case TensorLayout::RowMajor:
      return "row-major";
    case TensorLayout::BA16a64b2a:
      return "BA16a64b2a";
  }
  return "unknown";
}

std::optional<BlockedMatrices> blocked_view(uint64_t numel, int64_t K, int64_t batch) {
  if (K <= 0 || batch <= 0 || numel == 0) return std::nullopt;
  // K · batch ≤ numel, checked without forming a product that could wrap (a corrupt header).
  if (uint64_t(batch) > numel || uint64_t(K) > numel / uint64_t(batch)) return std::nullopt;
  const uint64_t per = uint64_t(K) * uint64_t(batch);
  if (numel % per != 0) return std::nullopt;
  BlockedMatrices m{batch, K, int64_t(numel / per)};
  // Padded sizes in 63 bits (a corrupt header must not overflow the length check).
  const unsigned __int128 total = (unsigned __int128)m.Kp() * uint64_t(m.Np()) * uint64_t(batch);
  if (total >> 62) return std::nullopt;
  return m;
}

namespace {

int64_t blocked_index(const BlockedMatrices& m, int64_t k, int64_t n) {
  return (n / 64) * m.Kp() * 64 + (k / 2) * 128 + (n % 64) * 2 + k % 2;
}

}  // namespace

void to_ba16a64b2a(const uint16_t* w, const BlockedMatrices& m, uint16_t* out) {
  std::fill(out, out + m.matrix_values(), uint16_t(0));
  for (int64_t k = 0; k < m.K; ++k)
    for (int64_t n = 0; n < m.N; ++n) out[blocked_index(m, k, n)] = w[k * m.N + n];
}

void from_ba16a64b2a(const uint16_t* blocked, const BlockedMatrices& m, uint16_t* w) {
  for (int64_t k = 0; k < m.K; ++k)
    for (int64_t n = 0; n < m.N; ++n) w[k * m.N + n] = blocked[blocked_index(m, k, n)];
}

}  // namespace kiln
