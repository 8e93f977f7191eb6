// What the fuzz targets (tests/fuzz/fuzz_*.cpp) share. Each target is one LLVMFuzzerTestOneInput
// that hands the input to one parser of untrusted bytes: kiln::Error is the expected way to refuse
// an input; any other exception, a crash, a hang or a sanitizer report is a finding. The same
// sources build into fuzz_replay (replay_test.cpp), which runs the committed regression inputs
// and the seed corpora through them in the normal test suite.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kiln::fuzz {

// Thrown for a broken invariant that the parser did not report itself (it accepted an input and
// then handed back something inconsistent). Not a kiln::Error, so it escapes the targets: libFuzzer
// aborts on it and keeps the input, the replay test fails the input.
class Finding : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Each target calls refused() with the kiln::Error that refused an input; the replay test checks
// that no seed (a valid input by construction) is refused, so that the corpora stay deep.
namespace detail {
inline std::string& last_refusal() {
  static std::string message;
  return message;
}
}  // namespace detail
inline void refused(const std::exception& e) {
  detail::last_refusal() = e.what();
}
inline std::string take_refusal() {
  return std::exchange(detail::last_refusal(), std::string());
}

// The parsers that take a path read their input from a private scratch directory (under /dev/shm
// when it is writable, so no disk I/O per execution), created once per process and removed at
// exit. Each call empties it first.
std::string write_scratch_file(const std::string& name, std::span<const uint8_t> bytes);
const std::string& scratch_dir();

// A bundle is several named files in one input, for the parsers that read a directory (a sharded
// checkpoint, an adapter, an artifact):
//   repeated { u8 name length, name, u32 little-endian data length, data }
// Names are relative paths of at most three components of at most 200 bytes; a byte outside
// [A-Za-z0-9._-] becomes '_', and a component starting with '.' gets a '_' in front. A data length
// past the end of the input takes what is left; at most 32 files are read. tests/fuzz/make_seeds.py
// writes bundles and unpacks them (`make_seeds.py unpack BUNDLE DIR`) to look at a finding.
struct BundleFile {
  std::string name;  // sanitised relative path
  std::vector<uint8_t> bytes;
};
std::vector<BundleFile> unpack_bundle(std::span<const uint8_t> input);
// Empties the scratch directory and writes every file of the bundle into it.
void write_bundle(const std::vector<BundleFile>& files);
const BundleFile* find_file(const std::vector<BundleFile>& files, const std::string& name);

// A copy of `bytes` at a 64-byte aligned address of its own, exactly as long as the input (so
// AddressSanitizer sees a read past its end), for parsers that get a pointer into a mapping.
class AlignedCopy {
 public:
  explicit AlignedCopy(std::span<const uint8_t> bytes);
  uint8_t* data() { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_;
};

// Blobs carry a CRC-32C of their header; a mutated header would almost never get past it, so the
// targets recompute it (when the preamble's header length fits) to reach the code behind it.
void fix_blob_header_crc(std::span<uint8_t> blob);

}  // namespace kiln::fuzz
