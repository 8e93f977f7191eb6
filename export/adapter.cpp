#include "export/adapter.h"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "common/bf16.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "common/mapped_file.h"
#include "export/qk_clip.h"
#include "schema/blob_file.h"
#include "schema/format.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

std::string utc_now() {
  std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

AdapterRecord record_of(const AdapterSource& src) {
  AdapterRecord r;
  r.format = adapter_format_name(src.format());
  r.source = src.dir();
  r.rank = src.rank();
  r.lora_alpha = src.lora_alpha();
  r.use_rslora = src.use_rslora();
  r.lora_scale = src.user_scale();
  r.created_utc = utc_now();
  for (const auto& t : src.targets())
    r.targets.push_back({t.layer, t.tensor, t.rank, float(t.scale)});
  return r;
}

// Removes a path on scope exit unless released.
class RemoveOnExit {
 public:
  explicit RemoveOnExit(fs::path p) : path_(std::move(p)) {}
  ~RemoveOnExit() {
    if (!path_.empty()) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

}  // namespace

AdapterRecord merged_adapter_record(const AdapterSource& src) {
  AdapterRecord r = record_of(src);
  r.name = fs::path(src.dir()).filename().string();
  r.merged = true;
  return r;
}

AdapterRecord write_adapter_blobs(const AdapterSource& src, const ModelConfig& base,
                                  const QkClipRecord& qk_clip, const std::string& name,
                                  const std::string& dir) {
  check_adapter_name(name, src.dir());
  AdapterRecord record = record_of(src);
  record.name = name;
  fs::create_directories(dir);
  const auto& targets = src.targets();
  std::vector<uint16_t> a16, b16;
  for (size_t i = 0; i < targets.size();) {
    const int layer = targets[i].layer;
    size_t end = i;
    while (end < targets.size() && targets[end].layer == layer) ++end;
    std::vector<TensorSpec> specs;
    for (size_t j = i; j < end; ++j) {
      auto [in, out] = lora_in_out(base, targets[j].tensor);
      specs.push_back({targets[j].tensor + ".lora_a", {in, targets[j].rank}});
      specs.push_back({targets[j].tensor + ".lora_b", {targets[j].rank, out}});
    }
    char file[32];
    std::snprintf(file, sizeof file, "layer-%03d.kblob", layer);
    const LayerKind kind = base.is_moe_layer(layer) ? LayerKind::MoE : LayerKind::Dense;
    BlobWriter writer((fs::path(dir) / file).string(), layer, kind, specs);
    for (size_t j = i; j < end; ++j) {
      throw_if_interrupted("adapter");
      LoraDelta d = src.read(layer, targets[j].tensor);
      apply_qk_clip_to_lora_b(qk_clip, base, layer, targets[j].tensor, d.b.data(), d.rank);
      a16.resize(d.a.size());
      b16.resize(d.b.size());
      NonFiniteCounts bad = convert_f32_to_bf16(d.a.data(), a16.data(), d.a.size());
      bad += convert_f32_to_bf16(d.b.data(), b16.data(), d.b.size());
      if (bad.nan || bad.inf)
        throw Error(src.dir() + ": LoRA weights of layer " + std::to_string(layer) + " " +
                    targets[j].tensor + " hold non-finite values");
      writer.write_tensor(targets[j].tensor + ".lora_a", a16.data(), a16.size() * 2);
      writer.write_tensor(targets[j].tensor + ".lora_b", b16.data(), b16.size() * 2);
    }
    auto res = writer.finish();
    record.blobs.push_back({(fs::path(kAdaptersDir) / name / file).string(), layer, kind, res.size,
                            res.header_crc32c});
    i = end;
  }
  return record;
}

Manifest read_manifest(const std::string& artifact, bool verify_checksum) {
  const std::string path = (fs::path(artifact) / kManifestFile).string();
  if (!fs::exists(path)) throw Error(path + ": missing (not a kiln artifact directory?)");
  MappedFile f(path);
  return parse_manifest(f.data(), f.size(), path, verify_checksum);
}

void write_manifest(const std::string& artifact, const Manifest& m) {
  const fs::path path = fs::path(artifact) / kManifestFile;
  const fs::path tmp =
      fs::path(artifact) / (std::string(".") + kManifestFile + ".tmp-" + std::to_string(getpid()));
  RemoveOnExit cleanup(tmp);
  std::vector<uint8_t> bytes = serialize_manifest(m);
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    f.flush();
    if (!f) throw Error(tmp.string() + ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error(path.string() + ": cannot replace the manifest: " + ec.message());
  cleanup.release();
}

AdapterRecord add_adapter(const AddAdapterOptions& opt) {
  Manifest m = read_manifest(opt.artifact, opt.verify_checksum);
  check_adapter_name(opt.name, "--name");
  const AdapterRecord* existing = m.find_adapter(opt.name);
  if (existing && !opt.force)
    throw Error(opt.artifact + ": already has an adapter named '" + opt.name +
                "' (use --force to replace it)");
  AdapterSource src = AdapterSource::open(opt.adapter_dir, m.config, opt.lora_scale);

  const fs::path adapters = fs::path(opt.artifact) / kAdaptersDir;
  const fs::path final_dir = adapters / opt.name;
  const fs::path tmp = adapters / ("." + opt.name + ".kiln-tmp-" + std::to_string(getpid()));
  const bool made_adapters_dir = !fs::exists(adapters);
  RemoveOnExit drop_tmp(tmp);
  RemoveOnExit drop_adapters_dir(made_adapters_dir ? adapters : fs::path());
  AdapterRecord record = write_adapter_blobs(src, m.config, m.qk_clip, opt.name, tmp.string());

  // Swap in: the old directory (with --force) moves aside until the new manifest is in place.
  std::error_code ec;
  const fs::path old = adapters / ("." + opt.name + ".kiln-old-" + std::to_string(getpid()));
  RemoveOnExit drop_old(old);
  if (fs::exists(final_dir)) {
    fs::rename(final_dir, old, ec);
    if (ec)
      throw Error(final_dir.string() + ": cannot move the old adapter aside: " + ec.message());
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    if (fs::exists(old)) fs::rename(old, final_dir, ec);
    throw Error(final_dir.string() + ": cannot rename the new adapter into place: " + ec.message());
  }
  drop_tmp.release();
  std::erase_if(m.adapters,
                [&](const AdapterRecord& a) { return !a.merged && a.name == opt.name; });
  m.adapters.push_back(record);
  try {
    write_manifest(opt.artifact, m);
  } catch (...) {
    fs::remove_all(final_dir, ec);
    if (fs::exists(old)) fs::rename(old, final_dir, ec);
    throw;
  }
  drop_adapters_dir.release();
  return record;
}

void remove_adapter(const std::string& artifact, const std::string& name, bool verify_checksum) {
  Manifest m = read_manifest(artifact, verify_checksum);
  if (!m.find_adapter(name)) throw Error(artifact + ": has no adapter named '" + name + "'");
  std::erase_if(m.adapters, [&](const AdapterRecord& a) { return !a.merged && a.name == name; });
  write_manifest(artifact, m);
  std::error_code ec;
  fs::remove_all(fs::path(artifact) / kAdaptersDir / name, ec);
  const fs::path adapters = fs::path(artifact) / kAdaptersDir;
  if (fs::is_directory(adapters) && fs::is_empty(adapters)) fs::remove(adapters, ec);
}

}  // namespace kiln
