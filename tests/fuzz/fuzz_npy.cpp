// A .npy file (`kiln golden check --expect FILE.npy`): the input is the whole file.
#include "common/error.h"
#include "tests/fuzz/fuzz_common.h"
#include "tools/kiln/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const kiln::NpyArray a =
        kiln::read_npy_f32(kiln::fuzz::write_scratch_file("golden.npy", {data, size}));
    uint64_t n = 1;
    for (int64_t d : a.shape)
      if (d < 0 || __builtin_mul_overflow(n, uint64_t(d), &n))
        throw kiln::fuzz::Finding("read_npy_f32 returned an impossible shape");
    if (n != a.data.size())
      throw kiln::fuzz::Finding("read_npy_f32 returned " + std::to_string(a.data.size()) +
                                " values for a shape of " + std::to_string(n) + " elements");
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
