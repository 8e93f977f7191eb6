// One safetensors file (`kiln export --checkpoint FILE.safetensors`): the input is the whole file.
#include "common/error.h"
#include "export/safetensors.h"
#include "tests/fuzz/fuzz_common.h"
#include "tests/fuzz/fuzz_tensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const std::string path = kiln::fuzz::write_scratch_file("model.safetensors", {data, size});
    kiln::fuzz::read_every_tensor(kiln::Checkpoint::open({path}));
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
