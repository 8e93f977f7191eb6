// A PEFT LoRA adapter (fuzz_adapter.h); seeded with PEFT adapters.
#include "tests/fuzz/fuzz_adapter.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return kiln::fuzz::open_adapter_bundle(data, size);
}
