// manifest.kfb: what an artifact contains and where it came from (kiln.fbs `Manifest`).
// Plain structs for the rest of the code; FlatBuffers stays inside manifest.cpp.
//
// File layout (format 1.3 on): the FlatBuffer, then a 16-byte trailer
//   magic "KILNMCRC", u32 CRC-32C of the FlatBuffer bytes, u32 zero (little-endian).
// The blob headers' checksums are in the manifest, and every tensor's checksum in its blob header,
// so this one checksum anchors the whole artifact. Readers before 1.3 verify the FlatBuffer with
// the file's full length, which the FlatBuffers verifier accepts with trailing bytes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "schema/blob_file.h"
#include "schema/model_config.h"

namespace kiln {

struct BlobEntry {
  std::string file;  // relative to the artifact directory
  int layer = -1;
  LayerKind kind = LayerKind::Globals;
  uint64_t size = 0;
  uint32_t header_crc32c = 0;
};

struct Provenance {
  std::string exporter_version;
  std::string created_utc;
  std::vector<std::pair<std::string, uint64_t>> sources;  // path, size in bytes
  std::string config_source;
  std::string key_layout;
  bool scanned = false;
  int scan_axis = 1;
  std::vector<std::pair<std::string, std::string>> options;
  uint64_t nonfinite_nan = 0;
  uint64_t nonfinite_inf = 0;
};

// What QK-Clip did at export (kiln.fbs `QkClip`).
struct QkClipRecord {
  bool applied = false;
  double threshold = 0;
  std::string mode;     // "mla" | "query"
  std::string targets;  // which tensors and columns were scaled, in words
  bool per_group = false;
  std::vector<std::string> sources;
  int64_t heads = 0;
  std::vector<float> gamma;      // [layers, heads]; 1 = untouched
  std::vector<float> max_logit;  // [layers, heads]; NaN where no statistics
  int64_t clipped_heads() const {
    int64_t n = 0;
    for (float g : gamma) n += g < 1.0f;
    return n;
  }
  float smallest_gamma() const {  // 1 when nothing was clipped
    float m = 1.0f;
    for (float g : gamma) m = std::min(m, g);
    return m;
  }
};

// A LoRA adapter recorded in the manifest (kiln.fbs `Adapter`).
struct AdapterTargetRecord {
  int layer = 0;
  std::string tensor;
  int64_t rank = 0;
  float scale = 0;
};
struct AdapterRecord {
  std::string name;
  bool merged = false;  // folded into the base weights at export: no blobs
  std::string format;   // "maxtext" | "peft"
  std::string source;
  int64_t rank = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  double lora_scale = 1;
  std::vector<AdapterTargetRecord> targets;
  std::vector<BlobEntry> blobs;  // relative to the artifact directory
  std::string created_utc;
  uint64_t bytes() const {
    uint64_t n = 0;
    for (const auto& b : blobs) n += b.size;
    return n;
  }
  // How many layers each adapted tensor name has an adapter in, by name.
  std::map<std::string, int64_t> targets_per_tensor() const {
    std::map<std::string, int64_t> n;
    for (const auto& t : targets) n[t.tensor]++;
    return n;
  }
};

struct Manifest {
  uint16_t format_major = 0;
  uint16_t format_minor = 0;
  ModelConfig config;
  std::vector<BlobEntry> blobs;
  std::vector<uint8_t> tokenizer;
  Provenance provenance;
  QkClipRecord qk_clip;
  std::vector<AdapterRecord> adapters;

  const AdapterRecord* find_adapter(const std::string& name) const {
    for (const auto& a : adapters)
      if (!a.merged && a.name == name) return &a;
    return nullptr;
  }
};

// Adapter names become directory names: letters, digits, '-', '_', '.', not starting with '.'.
// Throws kiln::Error naming `where` otherwise.
void check_adapter_name(const std::string& name, const std::string& where);

inline constexpr char kManifestTrailerMagic[8] = {'K', 'I', 'L', 'N', 'M', 'C', 'R', 'C'};
inline constexpr size_t kManifestTrailerSize = 16;

// The FlatBuffer followed by its checksum trailer: the bytes of manifest.kfb.
std::vector<uint8_t> serialize_manifest(const Manifest& m);

// Checks and converts the bytes of manifest.kfb: with `verify_checksum`, the trailer must be
// present and match (a manifest without one predates format 1.3); without, a trailer is skipped
// unchecked and a manifest without one is read as is (the caller accepts the risk). Then the
// FlatBuffers verifier, identifier, format version and config. Throws kiln::Error naming `path`.
Manifest parse_manifest(const uint8_t* data, size_t size, const std::string& path,
                        bool verify_checksum);

// DIR/manifest.kfb, the manifest of the artifact directory `dir`.
std::string manifest_path(const std::string& dir);

// Reads and parses the manifest file at `path` (parse_manifest: the checksum trailer must be
// present and match unless `verify_checksum` is false). Throws kiln::Error naming the file.
Manifest read_manifest_file(const std::string& path, bool verify_checksum = true);

// The same for the manifest of the artifact directory `dir`; a missing one is reported as such.
Manifest read_manifest_in(const std::string& dir, bool verify_checksum = true);

}  // namespace kiln
