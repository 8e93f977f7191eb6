// The .kblob container: one decoder layer (or the globals) per file.
//
//   offset 0   32-byte preamble: magic "KILNBLOB", u16 format major, u16 format minor, u32 zero,
//              u64 header length, u32 CRC-32C of the header, u32 zero (all little-endian)
//   offset 32  FlatBuffer `BlobHeader` (kiln.fbs): tensor names, dtypes, shapes, offsets, CRCs
//   then       raw tensor bytes, each tensor starting on a 64-byte boundary of the file
//
// Tensor bytes live outside the FlatBuffer so a blob can exceed 2 GiB and the engine can use the
// mapped bytes in place.
#pragma once

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "schema/format.h"
#include "schema/model_config.h"

namespace kiln {

namespace fb {
struct BlobHeader;
}

enum class LayerKind : uint8_t { Globals = 0, Dense = 1, MoE = 2 };

inline constexpr size_t kBlobPreambleSize = 32;
inline constexpr char kBlobMagic[8] = {'K', 'I', 'L', 'N', 'B', 'L', 'O', 'B'};

struct BlobTensorInfo {
  std::string name;
  DType dtype = DType::BF16;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // from the start of the file
  uint64_t length = 0;  // bytes
  uint32_t crc32c = 0;
  TensorLayout layout = TensorLayout::RowMajor;
  int64_t matrix_k = 0, matrix_batch = 1;  // BA16a64b2a: matrix_batch matrices of matrix_k rows
  // The blocked view of a BA16a64b2a tensor (checked by BlobView at construction).
  BlockedMatrices blocked() const;
};

// Writes one blob, streaming tensor data in the order the tensors were declared. The header is
// laid out first with the final offsets and patched with the checksums at finish().
class BlobWriter {
 public:
  BlobWriter(const std::string& path, int layer, LayerKind kind,
             const std::vector<TensorSpec>& tensors, DType dtype = DType::BF16);
  ~BlobWriter();
  BlobWriter(const BlobWriter&) = delete;
  BlobWriter& operator=(const BlobWriter&) = delete;

  // Appends bytes of the current tensor; a tensor is complete once `length` bytes were appended,
  // and the next append goes to the next tensor.
  void append(const void* data, size_t bytes);
  // Convenience: the whole tensor `name` (must be the next one) at once.
  void write_tensor(const std::string& name, const void* data, size_t bytes);
  // Writes the final header, flushes and closes. Returns the file size and the header checksum.
  struct Result {
    uint64_t size;
    uint32_t header_crc32c;
  };
  Result finish();

  const std::vector<BlobTensorInfo>& tensors() const { return tensors_; }

 private:
  std::vector<uint8_t> build_header() const;
  void write_at(uint64_t offset, const void* data, size_t bytes);
  // Writes zeros from the current position up to `offset`: every byte not covered by the
  // preamble, the header or a tensor is zero, so equal inputs give byte-identical blobs.
  void pad_to(uint64_t offset);

  std::string path_;
  int layer_;
  LayerKind kind_;
  std::vector<BlobTensorInfo> tensors_;
  std::FILE* file_ = nullptr;
  size_t current_ = 0;     // index of the tensor being written
  uint64_t written_ = 0;   // bytes of the current tensor written so far
  uint64_t file_pos_ = 0;  // current write position
  uint64_t total_size_ = 0;
  uint16_t major_ = kFormatMajor;  // kFormatMajorBlocked once a tensor is not row-major
};

// A verified view of a blob held in memory (typically an mmapped file). Construction checks the
// preamble, the header checksum, the FlatBuffers verifier, and that every tensor lies inside the
// file, 64-byte aligned, with length == product(shape) × dtype size. Any failure throws
// kiln::Error naming `path` (and the tensor).
class BlobView {
 public:
  BlobView(const uint8_t* data, size_t size, const std::string& path);

  int layer() const { return layer_; }
  LayerKind kind() const { return kind_; }
  uint32_t header_crc32c() const { return header_crc_; }
  const std::vector<BlobTensorInfo>& tensors() const { return tensors_; }
  // nullptr if absent.
  const BlobTensorInfo* find(const std::string& name) const;
  // Throws naming the tensor if absent, if its dtype/shape differ from the expectation, or if it
  // is not stored row-major.
  const BlobTensorInfo& expect(const std::string& name, DType dtype,
                               const std::vector<int64_t>& shape) const;
  // The same for a bf16 matrix (or `batch` stacked matrices) of K rows, which may also be stored
  // in BA16a64b2a; then with those K and batch.
  const BlobTensorInfo& expect_matrix(const std::string& name, const std::vector<int64_t>& shape,
                                      int64_t K, int64_t batch = 1) const;
  std::span<const uint8_t> bytes(const BlobTensorInfo& t) const {
    return {data_ + t.offset, t.length};
  }
  // Throws naming the tensor when `crc` (computed by the caller over bytes(t)) is not the CRC-32C
  // the header records for it.
  void check_crc(const BlobTensorInfo& t, uint32_t crc) const;
  // Recomputes every tensor's CRC-32C on this thread; throws naming the first that does not match.
  // (The engine splits each tensor over its threads instead: engine/artifact.h verify_tensor.)
  void verify_checksums() const;
  const std::string& path() const { return path_; }

 private:
  const uint8_t* data_;
  size_t size_;
  std::string path_;
  int layer_ = -1;
  LayerKind kind_ = LayerKind::Globals;
  uint32_t header_crc_ = 0;
  std::vector<BlobTensorInfo> tensors_;
};

std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace kiln
