// Opening an artifact directory: mmap the manifest and every blob and verify them before any
// weight is used. Every failure names the file (and tensor).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/mapped_file.h"
#include "schema/blob_file.h"
#include "schema/manifest.h"

namespace kiln {

// Checks a mapped blob against its manifest entry (size, header checksum, layer and kind; `path`
// names it in errors) and returns its view. Shared by the base blobs and the adapter blobs.
BlobView check_listed_blob(const MappedFile& file, const BlobEntry& e, const std::string& path);

// Recomputes tensor `t` of `blob` (its CRC-32C split over the OpenMP threads) and throws
// kiln::Error naming the blob and the tensor if it differs from the header's. Shared by the base
// and the adapter blobs.
void verify_tensor(const BlobView& blob, const BlobTensorInfo& t);

struct ArtifactOptions {
  // Check the manifest's checksum and every tensor's CRC-32C (which reads every byte). false: the
  // structure only (sizes, headers, shapes); the caller accepts damaged weights going unnoticed.
  bool verify_checksums = true;
  // With verify_checksums, check each tensor when bf16() first hands out its pointer instead of
  // all at open, so that the check is the first read of its bytes and the caller's own first pass
  // (a re-layout) finds them in memory. The caller must call verify_remaining() before computing
  // with anything.
  bool verify_on_first_use = false;
};

class Artifact {
 public:
  // Checks: manifest (FlatBuffers verifier, identifier, version, config); each blob's size and
  // header checksum against the manifest, its preamble, header and tensor bounds; the layer index
  // and kind; every expected tensor present with the dtype and shape the config implies and no
  // unexpected tensor.
  static std::unique_ptr<Artifact> open(const std::string& dir, const ArtifactOptions& opt = {});

  const std::string& dir() const { return dir_; }
  const Manifest& manifest() const { return manifest_; }
  const ModelConfig& config() const { return manifest_.config; }
  const BlobView& globals() const { return views_.front(); }
  const BlobView& layer(int64_t l) const { return views_.at(size_t(l) + 1); }
  uint64_t total_bytes() const;
  // Drops the resident pages of layer l's mapping (e.g. after its weights were copied into a
  // faster layout); anything still read from it is paged back in on demand.
  void release_layer_pages(int64_t l) const { files_.at(size_t(l) + 1)->release_pages(); }
  // The same for one tensor of a blob of this artifact.
  void release_tensor_pages(const BlobView& blob, const std::string& name) const;

  // A tensor's bytes as bf16 values, checked against the expected shape (and, on first use with
  // verify_on_first_use, against its checksum). Not thread-safe.
  const uint16_t* bf16(const BlobView& blob, const std::string& name,
                       const std::vector<int64_t>& shape) const;
  // A matrix (or `batch` stacked matrices) of K rows, stored row-major or in BA16a64b2a
  // (schema/tensor_layout.h), handed out without checking its checksum yet: for a caller whose
  // own first pass over the bytes computes their CRC-32C (a re-layout) and hands it to
  // settle_checksum(), or nullopt to have the tensor checked there. `pending` tells whether a
  // check is still owed.
  struct Matrix {
    const uint16_t* data = nullptr;
    bool blocked = false;  // BA16a64b2a; then `layout` gives the padded sizes
    BlockedMatrices layout;
    bool pending = false;
  };
  Matrix matrix_deferred(const BlobView& blob, const std::string& name,
                         const std::vector<int64_t>& shape, int64_t K, int64_t batch = 1) const;
  // Checks a tensor handed out by matrix_deferred against `crc` (computed by the caller over its
  // bytes), or reads and checks it when `crc` is empty; throws like verification at open.
  void settle_checksum(const BlobView& blob, const std::string& name,
                       std::optional<uint32_t> crc) const;
  // Checks every tensor not yet checked (verify_on_first_use); nothing without verification.
  void verify_remaining() const;
  bool verifies_checksums() const { return verify_; }
  // Time spent so far: in open() outside the checksums (manifest, mappings, structure checks),
  // and checking checksums (in open() or on first use).
  double open_seconds() const { return open_seconds_; }
  double verify_seconds() const { return verify_seconds_; }

 private:
  size_t index_of(const BlobView& blob) const;    // throws for a view of another artifact
  void verify(size_t blob, size_t tensor) const;  // checks, times and marks one tensor

  std::string dir_;
  uint64_t manifest_bytes_ = 0;
  Manifest manifest_;
  std::vector<std::unique_ptr<MappedFile>> files_;  // globals, layer 0, layer 1, …
  std::vector<BlobView> views_;
  bool verify_ = true;
  mutable std::vector<std::vector<bool>> verified_;  // [blob][tensor], with verify_on_first_use
  double open_seconds_ = 0;
  mutable double verify_seconds_ = 0;
};

}  // namespace kiln
