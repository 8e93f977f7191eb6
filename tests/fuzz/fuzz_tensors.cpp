#include "tests/fuzz/fuzz_tensors.h"

#include <algorithm>
#include <vector>

#include "export/safetensors.h"

namespace kiln::fuzz {

void read_every_tensor(const Checkpoint& checkpoint) {
  constexpr int64_t kMaxElements = int64_t(1) << 16;
  for (const SourceTensor& t : checkpoint.tensors()) {
    const int64_t n = t.numel();
    if (n > kMaxElements) continue;
    // Never an empty vector's null data(): read_as_f32 memcpy()s zero bytes to it, undefined
    // behaviour that no exporter call reaches (reported; not what this target looks for).
    std::vector<float> values(static_cast<size_t>(std::max<int64_t>(n, 1)));
    read_as_f32(t, values.data());
    const int rank = int(t.shape.size());
    if (rank == 0) continue;
    for (int axis : {0, rank - 1}) {
      if (t.shape[size_t(axis)] == 0) continue;
      const int64_t len = t.shape[size_t(axis)];
      std::vector<float> slice(static_cast<size_t>(std::max<int64_t>(n / len, 1)));
      for (int64_t index : {int64_t(0), len - 1}) read_slice_as_f32(t, axis, index, slice.data());
    }
  }
}

}  // namespace kiln::fuzz
