// Run-time LoRA (issue 4): adapters of an artifact mapped beside the base weights and applied as
// y = x·W + s·(x·A)·B, per row, without touching W. One engine serves several adapters at once:
// every row of a forward pass names its own adapter (or none).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/mapped_file.h"
#include "schema/manifest.h"

namespace kiln {

// The projections LoRA can adapt, one slot per canonical tensor (export/lora.h names them).
enum class LoraSlot : uint8_t {
  q,
  k,
  v,
  o,
  wi_0,
  wi_1,
  wo,  // Llama family (o and the dense MLP also DeepSeek)
  wq_a,
  wq_b,
  query,
  wkv_a,
  wkv_b,  // DeepSeek MLA
  count
};
std::optional<LoraSlot> lora_slot(const std::string& tensor);

// One adapted projection: A [in, rank] and B [rank, out], bf16, read in place from the mapping.
struct LoraFactors {
  const uint16_t* a = nullptr;
  const uint16_t* b = nullptr;
  int64_t in = 0, out = 0, rank = 0;
  float scale = 0;
};

class LoraAdapter {
 public:
  // Maps and verifies the adapter's blobs (size and header checksum against the record, preamble,
  // FlatBuffers header, every tensor's dtype and shape against the config; with verify_checksums,
  // the default, also every tensor's CRC-32C). Reads nothing of the base. Throws kiln::Error
  // naming the file.
  static std::shared_ptr<const LoraAdapter> open(const std::string& artifact_dir,
                                                 const ModelConfig& c, const AdapterRecord& rec,
                                                 bool verify_checksums = true);

  const std::string& name() const { return name_; }
  uint64_t bytes() const { return bytes_; }  // mapped blob bytes
  int64_t max_rank() const { return max_rank_; }
  // nullptr when this adapter leaves (layer, slot) alone.
  const LoraFactors* get(int64_t layer, LoraSlot s) const {
    const LoraFactors& f = table_[size_t(layer) * size_t(LoraSlot::count) + size_t(s)];
    return f.a ? &f : nullptr;
  }

 private:
  std::string name_;
  uint64_t bytes_ = 0;
  int64_t max_rank_ = 0;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::vector<LoraFactors> table_;  // [layers, LoraSlot::count]
};

}  // namespace kiln
