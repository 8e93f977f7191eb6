// Opening an artifact directory (Artifact::open, what every command does first, without the
// engine): the input is a bundle (fuzz_common.h) of manifest.kfb and the blobs. Checksums are made
// to match so that mutations get past them: each blob's header checksum, and, when the manifest
// parses, its record of each blob's size and header checksum (the manifest is then written as
// serialize_manifest writes it).
#include <filesystem>

#include "common/error.h"
#include "engine/artifact.h"
#include "schema/manifest.h"
#include "tests/fuzz/fuzz_common.h"

namespace {

uint32_t preamble_crc(const std::vector<uint8_t>& blob) {
  if (blob.size() < kiln::kBlobPreambleSize) return 0;
  uint32_t crc = 0;
  for (int i = 3; i >= 0; --i) crc = (crc << 8) | blob[size_t(24 + i)];
  return crc;
}

void match_manifest_to_blobs(std::vector<kiln::fuzz::BundleFile>& files) {
  for (auto& f : files)
    if (f.name.ends_with(".kblob")) kiln::fuzz::fix_blob_header_crc(f.bytes);
  kiln::fuzz::BundleFile* manifest = nullptr;
  for (auto& f : files)
    if (f.name == "manifest.kfb") manifest = &f;  // the last one, as write_bundle leaves it
  if (!manifest) return;
  try {
    kiln::fuzz::AlignedCopy copy(manifest->bytes);
    kiln::Manifest m = kiln::parse_manifest(copy.data(), copy.size(), "manifest.kfb", false);
    for (kiln::BlobEntry& e : m.blobs) {
      if (const auto* blob = kiln::fuzz::find_file(files, e.file)) {
        e.size = blob->bytes.size();
        e.header_crc32c = preamble_crc(blob->bytes);
      }
    }
    manifest->bytes = kiln::serialize_manifest(m);
  } catch (const kiln::Error&) {
    // Written as it came: Artifact::open refuses it the same way.
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto files = kiln::fuzz::unpack_bundle({data, size});
  match_manifest_to_blobs(files);
  try {
    kiln::fuzz::write_bundle(files);
    // Opening verifies the manifest's checksum (rewritten above) and every tensor's.
    kiln::Artifact::open(kiln::fuzz::scratch_dir());
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
