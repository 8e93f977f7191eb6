// Reading training parameters from safetensors files: one file, several files, or a sharded
// checkpoint described by an `*.index.json` (HF layout: {"weight_map": {key: file}}).
// Files are mmapped, never read whole; every header is validated before any tensor is used.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/dtype.h"
#include "common/mapped_file.h"

namespace kiln {

// The largest header the safetensors format allows (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

struct SourceTensor {
  std::string key;  // the key exactly as stored in the file
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the file's mapping
  size_t nbytes = 0;
  const MappedFile* file = nullptr;

  int64_t numel() const;
};

class Checkpoint {
 public:
  // Each path is a .safetensors file or an *.index.json of a sharded checkpoint (its shards are
  // resolved relative to the index's directory). Throws kiln::Error with a one-line message naming
  // the file (and key) for: a file that is missing or not a regular file, a header length larger
  // than the file or kMaxSafetensorsHeader, malformed header JSON (a number that does not fit
  // included), `__metadata__` that is not a map of strings, unsupported dtype, shape/byte-length
  // mismatch, data offsets outside the file (truncated file), data ranges that overlap, leave a
  // gap or end before the file does (they must tile the data buffer, as the format requires), a
  // key present in two files, an index naming a missing shard.
  static Checkpoint open(const std::vector<std::string>& paths);

  const std::vector<SourceTensor>& tensors() const { return tensors_; }
  const SourceTensor* find(const std::string& key) const;
  // The input files with their sizes in bytes (for provenance).
  std::vector<std::pair<std::string, uint64_t>> files() const;
  // Drops resident pages of every mapping (see MappedFile::release_pages).
  void release_pages() const;

 private:
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::vector<SourceTensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

// Reads a tensor (any supported dtype) as f32 values. `out` must hold numel() floats.
void read_as_f32(const SourceTensor& t, float* out);

// Copies the slice at `index` of axis `axis` of `t` (all other axes kept, order preserved) as f32
// into `out`, which must hold numel()/shape[axis] floats. This is how a scanned layer is unrolled.
void read_slice_as_f32(const SourceTensor& t, int axis, int64_t index, float* out);

// Writes f32 tensors as one safetensors file (through a temporary file, fsync'd and renamed into
// place, so a failure or a kill leaves nothing half-written). Used for max-logit statistics
// (`kiln calibrate`).
struct F32Tensor {
  std::string key;
  std::vector<int64_t> shape;
  std::vector<float> data;
};
void write_safetensors_f32(const std::string& path, const std::vector<F32Tensor>& tensors);

}  // namespace kiln
