// A JSON model config (fuzz_config.h).
#include "tests/fuzz/fuzz_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return kiln::fuzz::read_config_file("config.json", data, size);
}
