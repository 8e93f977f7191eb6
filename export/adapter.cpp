#include "export/adapter.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string_view>

#include "common/bf16.h"
#include "common/durable_output.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "common/mapped_file.h"
#include "export/qk_clip.h"
#include "schema/blob_file.h"
#include "schema/format.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {

AdapterRecord record_of(const AdapterSource& src) {
  AdapterRecord r;
  r.format = adapter_format_name(src.format());
  r.source = src.dir();
  r.rank = src.rank();
  r.lora_alpha = src.lora_alpha();
  r.use_rslora = src.use_rslora();
  r.lora_scale = src.user_scale();
  r.created_utc = output_time_utc();
  for (const auto& t : src.targets())
    r.targets.push_back({t.layer, t.tensor, t.rank, float(t.scale)});
  return r;
}

// An adapter change is committed once its complete new manifest lies durably beside the current
// one under this name (the journal); the next adapter command finishes a committed change a kill
// interrupted (recover_adapter_changes).
constexpr std::string_view kJournalPrefix = ".manifest.kfb.kiln-next-";

std::string journal_path(const std::string& artifact, const std::string& pid) {
  return (fs::path(artifact) / (std::string(kJournalPrefix) + pid)).string();
}

// Whether every blob of `r` exists with the size and header checksum the record lists, in the
// record's directory or, when given, in `dir`.
bool blobs_match(const std::string& artifact, const AdapterRecord& r, const std::string& dir = "") {
  try {
    for (const BlobEntry& b : r.blobs) {
      const std::string path = dir.empty() ? (fs::path(artifact) / b.file).string()
                                           : (fs::path(dir) / fs::path(b.file).filename()).string();
      MappedFile f(path);
      if (f.size() != b.size) return false;
      if (BlobView(f.data(), f.size(), path).header_crc32c() != b.header_crc32c) return false;
    }
    return true;
  } catch (const Error&) {
    return false;
  }
}

// Moves a directory no manifest uses out of the way in one step, then deletes it, so that a kill
// never leaves half of it under its name.
void discard_directory(const fs::path& dir) {
  const fs::path aside =
      dir.parent_path() / ("." + dir.filename().string() + ".kiln-old-" + std::to_string(getpid()));
  std::error_code ec;
  fs::rename(dir, aside, ec);
  if (ec) throw Error(dir.string() + ": cannot remove: " + ec.message());
  sync_path(dir.parent_path().string());
  fs::remove_all(aside, ec);
}

// Only one kiln command changes an artifact's adapters at a time.
FileHandle lock_artifact(const std::string& artifact, const char* what, bool verify_checksum) {
  read_manifest_in(artifact, verify_checksum);  // a directory that is no artifact is refused first
  return lock_directory(artifact, what);
}

void remove_if_empty(const fs::path& adapters) {
  std::error_code ec;
  if (fs::is_directory(adapters, ec) && fs::is_empty(adapters, ec)) fs::remove(adapters, ec);
}

// Finishes or undoes what a killed `kiln adapter add/remove` left (the caller holds the artifact's
// lock, so every leftover is dead): a committed change (a journal whose adapter directories are
// complete) is finished; temporaries, uncommitted journals and adapter directories the manifest
// does not use are removed. One stderr line for each.
void recover_adapter_changes(const std::string& artifact, bool verify_checksum) {
  const fs::path adapters = fs::path(artifact) / kAdaptersDir;
  std::vector<fs::path> journals;
  std::error_code ec;
  for (fs::directory_iterator it(artifact, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().starts_with(kJournalPrefix)) journals.push_back(it->path());
  std::sort(journals.begin(), journals.end());
  for (const fs::path& journal : journals) {
    const std::string pid = journal.filename().string().substr(kJournalPrefix.size());
    bool complete = false;
    try {
      // Journals are this kiln's own writing: one that fails its checksum was never completed.
      const Manifest next = read_manifest_file(journal.string(), true);
      complete = true;
      for (const AdapterRecord& r : next.adapters) {
        if (r.merged || blobs_match(artifact, r)) continue;
        const fs::path staged = adapters / ("." + r.name + ".kiln-tmp-" + pid);
        if (!fs::is_directory(staged) || !blobs_match(artifact, r, staged.string())) {
          complete = false;
          break;
        }
        // The current manifest must not list the directory being swapped while it is swapped.
        Manifest now = read_manifest_in(artifact, verify_checksum);
        if (std::erase_if(now.adapters,
                          [&](const AdapterRecord& a) { return !a.merged && a.name == r.name; }))
          write_manifest(artifact, now);
        move_into_place(staged.string(), (adapters / r.name).string(), true);
      }
      if (complete) rename_durably(journal.string(), manifest_path(artifact));
    } catch (const Error&) {
      complete = false;
    }
    if (complete) {
      std::fprintf(stderr,
                   "kiln: %s: finished an adapter change a killed kiln command had committed "
                   "(manifest.kfb from %s)\n",
                   artifact.c_str(), journal.filename().c_str());
    } else {
      fs::remove(journal, ec);
      std::fprintf(stderr,
                   "kiln: removed %s, an adapter change a killed kiln command had not "
                   "finished\n",
                   journal.c_str());
    }
  }
  remove_stale_temporaries_in(artifact);
  if (!fs::is_directory(adapters)) return;
  remove_stale_temporaries_in(adapters.string());
  const Manifest m = read_manifest_in(artifact, verify_checksum);
  std::vector<fs::path> unused;
  for (fs::directory_iterator it(adapters, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.starts_with('.') && it->is_directory() && !m.find_adapter(name))
      unused.push_back(it->path());
  }
  for (const fs::path& dir : unused) {
    discard_directory(dir);
    std::fprintf(stderr,
                 "kiln: removed %s, an adapter directory the manifest does not list (left "
                 "by a killed kiln command)\n",
                 dir.c_str());
  }
  remove_if_empty(adapters);
}

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
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir + ": cannot create directory: " + ec.message());
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

void write_manifest(const std::string& artifact, const Manifest& m) {
  write_file_durably(manifest_path(artifact), serialize_manifest(m));
}

AdapterRecord add_adapter(const AddAdapterOptions& opt) {
  check_adapter_name(opt.name, "--name");
  const FileHandle lock = lock_artifact(opt.artifact, "kiln adapter add", opt.verify_checksum);
  recover_adapter_changes(opt.artifact, opt.verify_checksum);
  const Manifest m = read_manifest_in(opt.artifact, opt.verify_checksum);
  const bool replacing = m.find_adapter(opt.name) != nullptr;
  if (replacing && !opt.force)
    throw Error(opt.artifact + ": already has an adapter named '" + opt.name +
                "' (use --force to replace it)");
  AdapterSource src = AdapterSource::open(opt.adapter_dir, m.config, opt.lora_scale);

  const fs::path adapters = fs::path(opt.artifact) / kAdaptersDir;
  std::error_code ec;
  const bool made_adapters_dir = fs::create_directories(adapters, ec);
  if (ec) throw Error(adapters.string() + ": cannot create directory: " + ec.message());
  struct DropEmpty {
    fs::path dir;
    ~DropEmpty() {
      if (!dir.empty()) remove_if_empty(dir);
    }
  } drop_adapters_dir{made_adapters_dir ? adapters : fs::path()};

  StagedDirectory staged((adapters / opt.name).string());
  AdapterRecord record = write_adapter_blobs(src, m.config, m.qk_clip, opt.name, staged.path());
  sync_tree(staged.path());

  Manifest without = m;
  std::erase_if(without.adapters,
                [&](const AdapterRecord& a) { return !a.merged && a.name == opt.name; });
  Manifest next = without;
  next.adapters.push_back(record);
  const std::string journal = journal_path(opt.artifact, std::to_string(getpid()));
  {
    StagedFile f(manifest_path(opt.artifact));
    const std::vector<uint8_t> bytes = serialize_manifest(next);
    f.write(bytes.data(), bytes.size());
    f.commit(journal);  // committed: a kill from here on is finished by the next adapter command
  }
  try {
    // While the directories are swapped the manifest lists no adapter of this name: the artifact
    // stays loadable at every moment.
    if (replacing) write_manifest(opt.artifact, without);
    staged.commit(replacing);
    rename_durably(journal, manifest_path(opt.artifact));
  } catch (...) {
    // Undo unless the new directory is already in place (then the journal finishes the change).
    if (!blobs_match(opt.artifact, record)) {
      fs::remove(journal, ec);
      if (replacing) write_manifest(opt.artifact, m);
    }
    throw;
  }
  drop_adapters_dir.dir.clear();
  return record;
}

void remove_adapter(const std::string& artifact, const std::string& name, bool verify_checksum) {
  const FileHandle lock = lock_artifact(artifact, "kiln adapter remove", verify_checksum);
  recover_adapter_changes(artifact, verify_checksum);
  Manifest m = read_manifest_in(artifact, verify_checksum);
  if (!m.find_adapter(name)) throw Error(artifact + ": has no adapter named '" + name + "'");
  std::erase_if(m.adapters, [&](const AdapterRecord& a) { return !a.merged && a.name == name; });
  write_manifest(artifact, m);  // the change is done; what follows is clean-up
  const fs::path adapters = fs::path(artifact) / kAdaptersDir;
  if (fs::is_directory(adapters / name)) discard_directory(adapters / name);
  remove_if_empty(adapters);
}

}  // namespace kiln
