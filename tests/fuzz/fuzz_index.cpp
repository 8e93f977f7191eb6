// A sharded checkpoint (`kiln export --checkpoint model.safetensors.index.json`): the input is a
// bundle (fuzz_common.h) whose first file is the index and whose other files are the shards.
#include "common/error.h"
#include "export/safetensors.h"
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/fuzz_tensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto files = kiln::fuzz::unpack_bundle({data, size});
  if (files.empty()) return 0;
  try {
    kiln::fuzz::write_bundle(files);
    const std::string index = kiln::fuzz::scratch_dir() + "/" + files.front().name;
    kiln::fuzz::read_every_tensor(kiln::Checkpoint::open({index}));
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
