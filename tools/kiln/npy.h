// NumPy .npy files of float32, for golden logits exchanged with the numpy reference
// (`kiln golden dump` / `kiln golden check`).
//
// Written files are format version 1.0, dtype '<f4', C order, so `numpy.load` reads them as-is.
// Reading accepts versions 1.0, 2.0 and 3.0, dtype '<f4' or '<f8' (converted to float), C order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct NpyArray {
  std::vector<int64_t> shape;  // empty for a 0-d array, which holds one value
  std::vector<float> data;     // C (row-major) order; size() is the product of shape
};

// Writes `data` (the product of `shape` floats) to `path` through a temporary file, fsync'd and
// renamed into place (common/durable_output.h), so an interrupted or failed write never leaves a
// half-written file under `path`. Throws kiln::Error naming the file on any I/O failure.
void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape);

// Reads a whole .npy file. Throws kiln::Error naming the file and what was expected for a bad
// magic string, an unsupported version or dtype, Fortran order, a malformed header, or data that
// is shorter or longer than the shape says.
NpyArray read_npy_f32(const std::string& path);

}  // namespace kiln
