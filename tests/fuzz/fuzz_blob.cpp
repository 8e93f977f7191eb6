// One .kblob (BlobView): the input is the whole file, at an aligned address as a mapping gives
// it, with its header checksum made to match (fuzz_common.h).
#include "common/error.h"
#include "schema/blob_file.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::fuzz::AlignedCopy copy({data, size});
  kiln::fuzz::fix_blob_header_crc({copy.data(), copy.size()});
  try {
    const kiln::BlobView view(copy.data(), copy.size(), "layer_0.kblob");
    volatile uint8_t sink = 0;  // a tensor's first and last byte must be inside the input
    for (const kiln::BlobTensorInfo& t : view.tensors()) {
      if (t.layout == kiln::TensorLayout::RowMajor)
        view.expect(t.name, t.dtype, t.shape);
      else  // what the engine asks of a blocked matrix, with the K and batch it records
        view.expect_matrix(t.name, t.shape, t.matrix_k, t.matrix_batch);
      const auto bytes = view.bytes(t);
      if (!bytes.empty()) sink = sink ^ bytes.front() ^ bytes.back();
    }
    view.verify_checksums();
  } catch (const kiln::Error& e) {
    kiln::fuzz::refused(e);
  }
  return 0;
}
