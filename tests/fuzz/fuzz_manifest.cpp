// manifest.kfb (parse_manifest): the input is the whole file, at an aligned address as a mapping
// gives it.
#include "common/error.h"
#include "schema/manifest.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kiln::fuzz::AlignedCopy copy({data, size});
    // The checksum first (as every command reads it), then the FlatBuffer unchecked, so that
    // mutations which break the checksum still reach the parser behind it.
    try {
      kiln::parse_manifest(copy.data(), copy.size(), "manifest.kfb", true);
    } catch (const kiln::Error& e) {
      kiln::fuzz::refused(e);
    }
    const kiln::Manifest m = kiln::parse_manifest(copy.data(), copy.size(), "manifest.kfb", false);
    // What opening an artifact derives from the config next: the shapes its blobs must have.
    kiln::global_tensor_specs(m.config);
    for (int64_t l = 0; l < m.config.num_decoder_layers && l < 4; ++l)
      kiln::layer_tensor_specs(m.config, int(l));
    // kiln must read back whatever it writes (kiln adapter add rewrites a parsed manifest).
    const std::vector<uint8_t> again = kiln::serialize_manifest(m);
    try {
      kiln::parse_manifest(again.data(), again.size(), "manifest.kfb (re-serialised)", true);
    } catch (const kiln::Error& e) {
      throw kiln::fuzz::Finding(std::string("an accepted manifest, re-serialised, is refused: ") +
                                e.what());
    }
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
