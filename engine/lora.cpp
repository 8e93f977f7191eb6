#include "engine/lora.h"

#include <filesystem>

#include "common/error.h"
#include "engine/artifact.h"
#include "schema/blob_file.h"

namespace kiln {

namespace fs = std::filesystem;

std::optional<LoraSlot> lora_slot(const std::string& tensor) {
  static const std::pair<const char*, LoraSlot> kSlots[] = {
      {"attn.q", LoraSlot::q},         {"attn.k", LoraSlot::k},
      {"attn.v", LoraSlot::v},         {"attn.o", LoraSlot::o},
      {"mlp.wi_0", LoraSlot::wi_0},    {"mlp.wi_1", LoraSlot::wi_1},
      {"mlp.wo", LoraSlot::wo},        {"attn.wq_a", LoraSlot::wq_a},
      {"attn.wq_b", LoraSlot::wq_b},   {"attn.query", LoraSlot::query},
      {"attn.wkv_a", LoraSlot::wkv_a}, {"attn.wkv_b", LoraSlot::wkv_b},
  };
  for (const auto& [name, slot] : kSlots)
    if (tensor == name) return slot;
  return std::nullopt;
}

std::shared_ptr<const LoraAdapter> LoraAdapter::open(const std::string& artifact_dir,
                                                     const ModelConfig& c, const AdapterRecord& rec,
                                                     bool verify_checksums) {
  if (rec.merged)
    throw Error(artifact_dir + ": adapter '" + rec.name +
                "' was merged into the weights at export; it cannot be loaded separately");
  auto ad = std::make_shared<LoraAdapter>();
  ad->name_ = rec.name;
  ad->table_.resize(size_t(c.num_decoder_layers) * size_t(LoraSlot::count));
  // Shapes per (layer, tensor) come from the base config, so an adapter blob that does not fit
  // the model fails here, not in a matmul.
  std::vector<TensorSpec> base_specs;
  int spec_layer = -1;
  for (const BlobEntry& e : rec.blobs) {
    const fs::path rel(e.file);
    if (rel.is_absolute() || e.file.find("..") != std::string::npos)
      throw Error(artifact_dir + ": adapter '" + rec.name + "' blob path '" + e.file +
                  "' must stay inside the artifact");
    const std::string path = (fs::path(artifact_dir) / rel).string();
    if (!fs::exists(path))
      throw Error(path + ": missing (adapter '" + rec.name + "' is listed in the manifest)");
    if (e.layer < 0 || e.layer >= c.num_decoder_layers)
      throw Error(path + ": the manifest lists it for layer " + std::to_string(e.layer) +
                  ", outside the model's " + std::to_string(c.num_decoder_layers) + " layers");
    auto file = std::make_unique<MappedFile>(path);
    BlobView view = check_listed_blob(*file, e, path);
    if (verify_checksums)
      for (const auto& t : view.tensors()) verify_tensor(view, t);
    size_t used = 0;
    for (const AdapterTargetRecord& t : rec.targets) {
      if (t.layer != e.layer) continue;
      auto slot = lora_slot(t.tensor);
      if (!slot)
        throw Error(path + ": adapter target '" + t.tensor + "' is not a projection LoRA adapts");
      if (spec_layer != t.layer) {
        base_specs = layer_tensor_specs(c, t.layer);
        spec_layer = t.layer;
      }
      const TensorSpec* base = nullptr;
      for (const auto& s : base_specs)
        if (s.name == t.tensor) base = &s;
      if (!base)
        throw Error(path + ": adapter target '" + t.tensor + "' does not exist in layer " +
                    std::to_string(t.layer) + " of this model");
      // attn.o flattens [H, D, E] to [H·D, E]; every other kernel has one input axis.
      const size_t in_axes = t.tensor == "attn.o" ? 2 : 1;
      int64_t in = 1, out = 1;
      for (size_t i = 0; i < base->shape.size(); ++i) (i < in_axes ? in : out) *= base->shape[i];
      const BlobTensorInfo& a = view.expect(t.tensor + ".lora_a", DType::BF16, {in, t.rank});
      const BlobTensorInfo& b = view.expect(t.tensor + ".lora_b", DType::BF16, {t.rank, out});
      LoraFactors& f = ad->table_[size_t(t.layer) * size_t(LoraSlot::count) + size_t(*slot)];
      f = {reinterpret_cast<const uint16_t*>(view.bytes(a).data()),
           reinterpret_cast<const uint16_t*>(view.bytes(b).data()),
           in,
           out,
           t.rank,
           t.scale};
      ad->max_rank_ = std::max(ad->max_rank_, t.rank);
      used += 2;
    }
    if (used != view.tensors().size())
      throw Error(path + ": holds " + std::to_string(view.tensors().size()) +
                  " tensors, the manifest's targets for layer " + std::to_string(e.layer) +
                  " account for " + std::to_string(used));
    ad->bytes_ += file->size();
    ad->files_.push_back(std::move(file));
  }
  size_t loaded = 0;
  for (const auto& f : ad->table_) loaded += f.a != nullptr;
  if (loaded != rec.targets.size())
    throw Error(artifact_dir + ": adapter '" + rec.name + "' lists " +
                std::to_string(rec.targets.size()) + " targets but its blobs hold " +
                std::to_string(loaded));
  return ad;
}

}  // namespace kiln
