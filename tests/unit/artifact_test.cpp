// Artifact verification: a tensor's checksum split over the threads equals the one-shot check and
// finds a flip in any piece; with verify_on_first_use each tensor is checked when bf16() hands it
// out, and verify_remaining() checks the rest before anything is computed with them.
#include "engine/artifact.h"

#include <doctest/doctest.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <numeric>

#include "common/error.h"
#include "common/mapped_file.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

void flip_byte(const fs::path& p, uint64_t at) {
  std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(std::streamoff(at));
  char c = 0;
  f.get(c);
  f.seekp(std::streamoff(at));
  f.put(char(c ^ 0x01));
}

// One tensor large enough for the parallel checksum (6 MiB) and a small one.
fs::path write_big_blob() {
  const fs::path p = fs::temp_directory_path() / "kiln_artifact_test_big.kblob";
  std::vector<TensorSpec> specs = {{"big", {3 << 20}}, {"small", {100}}};
  BlobWriter w(p.string(), 0, LayerKind::Dense, specs);
  std::vector<uint16_t> big(size_t(3) << 20), small(100);
  std::iota(big.begin(), big.end(), uint16_t(1));
  std::iota(small.begin(), small.end(), uint16_t(7));
  w.write_tensor("big", big.data(), big.size() * 2);
  w.write_tensor("small", small.data(), small.size() * 2);
  w.finish();
  return p;
}

}  // namespace

TEST_CASE("verify_tensor splits a large tensor over the threads and finds a flip in any piece") {
  const fs::path p = write_big_blob();
  uint64_t offset = 0, length = 0;
  {
    MappedFile f(p.string());
    BlobView v(f.data(), f.size(), p.string());
    offset = v.find("big")->offset;
    length = v.find("big")->length;
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      CHECK_NOTHROW(verify_tensor(v, *v.find("big")));
      CHECK_NOTHROW(verify_tensor(v, *v.find("small")));
    }
  }
  // A flip at the start, in the middle (a piece boundary for 2 threads) and at the end.
  for (uint64_t at : {offset, offset + length / 2, offset + length - 1}) {
    flip_byte(p, at);
    MappedFile f(p.string());
    BlobView v(f.data(), f.size(), p.string());
    for (int threads : {1, 2, 3}) {
      CAPTURE(at);
      CAPTURE(threads);
      omp_set_num_threads(threads);
      CHECK_THROWS_WITH_AS(verify_tensor(v, *v.find("big")),
                           doctest::Contains("_big.kblob: tensor 'big' fails its CRC-32C check"),
                           Error);
      CHECK_NOTHROW(verify_tensor(v, *v.find("small")));
    }
    flip_byte(p, at);  // restore
  }
  omp_set_num_threads(2);
}
