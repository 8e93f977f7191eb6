#include "tests/fuzz/fuzz_common.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>

#include "common/crc32c.h"
#include "schema/blob_file.h"

namespace kiln::fuzz {

namespace fs = std::filesystem;

namespace {

// Created on first use; the process id in the name lets tools/fuzz remove what a crashed fuzzer
// (which skips destructors) left behind.
class ScratchDir {
 public:
  ScratchDir() {
    const fs::path base =
        ::access("/dev/shm", W_OK) == 0 ? fs::path("/dev/shm") : fs::temp_directory_path();
    std::string templ = (base / ("kiln-fuzz-" + std::to_string(::getpid()) + "-XXXXXX")).string();
    if (!::mkdtemp(templ.data())) {
      std::perror(("kiln fuzz: cannot create a scratch directory " + templ).c_str());
      std::abort();
    }
    path_ = templ;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

  void clear() const {
    for (const auto& entry : fs::directory_iterator(path_)) fs::remove_all(entry.path());
  }

 private:
  std::string path_;
};

const ScratchDir& scratch() {
  static const ScratchDir dir;
  return dir;
}

void write_file(const fs::path& path, std::span<const uint8_t> bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) ||
      std::fclose(f) != 0) {
    std::perror(("kiln fuzz: cannot write " + path.string()).c_str());
    std::abort();
  }
}

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// At most three components, none empty, none starting with '.', none longer than 200 bytes (the
// file system's limit is 255), only name characters.
std::string sanitise_name(std::string_view raw) {
  std::string out, component;
  int components = 0;
  auto flush = [&] {
    if (component.empty() || components == 3) return;
    if (component.front() == '.') component.insert(component.begin(), '_');
    component.resize(std::min<size_t>(component.size(), 200));
    out += (out.empty() ? "" : "/") + component;
    ++components;
    component.clear();
  };
  for (char c : raw) {
    if (c == '/') {
      flush();
      component.clear();
    } else {
      component += is_name_char(c) ? c : '_';
    }
  }
  flush();
  return out.empty() ? "_" : out;
}

uint64_t read_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

const std::string& scratch_dir() {
  return scratch().path();
}

std::string write_scratch_file(const std::string& name, std::span<const uint8_t> bytes) {
  scratch().clear();
  const fs::path path = fs::path(scratch().path()) / name;
  write_file(path, bytes);
  return path.string();
}

std::vector<BundleFile> unpack_bundle(std::span<const uint8_t> input) {
  constexpr size_t kMaxFiles = 32;
  std::vector<BundleFile> files;
  size_t pos = 0;
  while (files.size() < kMaxFiles && pos < input.size()) {
    const size_t name_len = input[pos++];
    if (input.size() - pos < name_len + 4) break;
    std::string_view raw(reinterpret_cast<const char*>(input.data() + pos), name_len);
    pos += name_len;
    const uint64_t declared = read_le(input.data() + pos, 4);
    pos += 4;
    const size_t len = size_t(std::min<uint64_t>(declared, input.size() - pos));
    files.push_back({sanitise_name(raw), {input.begin() + pos, input.begin() + pos + len}});
    pos += len;
  }
  return files;
}

void write_bundle(const std::vector<BundleFile>& files) {
  scratch().clear();
  const fs::path root = scratch().path();
  for (const BundleFile& f : files) {
    const fs::path path = root / f.name;
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    // A name that is also a directory of another file (a/b and a) is skipped: the bundle cannot
    // hold both, and which one wins does not matter to the parser.
    if (ec || fs::is_directory(path, ec)) continue;
    write_file(path, f.bytes);
  }
}

const BundleFile* find_file(const std::vector<BundleFile>& files, const std::string& name) {
  const BundleFile* found = nullptr;
  for (const BundleFile& f : files)
    if (f.name == name) found = &f;  // the last one is the one written
  return found;
}

AlignedCopy::AlignedCopy(std::span<const uint8_t> bytes)
    : data_(static_cast<uint8_t*>(
          ::operator new(std::max<size_t>(bytes.size(), 1), std::align_val_t(64)))),
      size_(bytes.size()) {
  if (!bytes.empty()) std::memcpy(data_.get(), bytes.data(), bytes.size());
}

void AlignedCopy::Free::operator()(uint8_t* p) const {
  ::operator delete(p, std::align_val_t(64));
}

void fix_blob_header_crc(std::span<uint8_t> blob) {
  if (blob.size() < kBlobPreambleSize) return;
  const uint64_t header_len = read_le(blob.data() + 16, 8);
  if (header_len > blob.size() - kBlobPreambleSize) return;
  const uint32_t crc = crc32c(blob.data() + kBlobPreambleSize, size_t(header_len));
  for (int i = 0; i < 4; ++i) blob[24 + i] = uint8_t(crc >> (8 * i));
}

}  // namespace kiln::fuzz
