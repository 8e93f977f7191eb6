#include "tools/kiln/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/checked.h"
#include "common/durable_output.h"
#include "common/error.h"
#include "common/file_io.h"

namespace kiln {
namespace {

// The format stores little-endian values and we copy them straight into floats.
static_assert(std::endian::native == std::endian::little, "npy I/O assumes a little-endian host");

constexpr std::string_view kMagic = "\x93NUMPY";
// A real header is ~100 bytes; the cap only stops a corrupt length from driving a huge allocation.
constexpr size_t kMaxHeaderLen = 1 << 20;

[[noreturn]] void fail(const std::string& path, const std::string& message) {
  throw Error(path + ": " + message);
}

std::string errno_text() {
  return std::strerror(errno);
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closing is where a delayed write error (e.g. a full disk over NFS) can surface.
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

// Returns false if the file ended first (it changed under us after the size check).
bool read_all(int fd, void* data, size_t size, const std::string& path) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = ::read(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path, "read failed: " + errno_text());
    if (n == 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Element count of `shape`, or an error if a dimension is negative or the product overflows.
uint64_t element_count(const std::vector<int64_t>& shape, const std::string& path) {
  for (const int64_t d : shape)
    if (d < 0) fail(path, "negative dimension in shape " + shape_text(shape));
  const std::optional<uint64_t> count = checked_bytes(shape, 1);
  if (!count) fail(path, "shape " + shape_text(shape) + " has too many elements");
  return *count;
}

// The header is a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// This parses exactly the literal forms numpy writes for that dict, nothing more general.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& path) : s_(text), path_(path) {}

  struct Header {
    std::string descr;
    bool fortran_order = false;
    std::vector<int64_t> shape;
  };

  Header parse() {
    Header h;
    bool seen_descr = false, seen_order = false, seen_shape = false;
    expect('{');
    while (!consume('}')) {
      const std::string key = string_literal();
      expect(':');
      if (key == "descr") {
        h.descr = string_literal();
        seen_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = bool_literal();
        seen_order = true;
      } else if (key == "shape") {
        h.shape = shape_literal();
        seen_shape = true;
      } else {
        bad("unexpected key '" + key + "'");
      }
      if (!consume(',')) {
        expect('}');
        break;
      }
    }
    if (!seen_descr || !seen_order || !seen_shape) {
      bad("expected the keys 'descr', 'fortran_order' and 'shape'");
    }
    return h;
  }

 private:
  [[noreturn]] void bad(const std::string& what) {
    fail(path_, "malformed .npy header: " + what + " in \"" + std::string(trimmed()) + "\"");
  }

  std::string_view trimmed() const {
    std::string_view t = s_;
    while (!t.empty() && (t.back() == ' ' || t.back() == '\n' || t.back() == '\0')) {
      t.remove_suffix(1);
    }
    return t;
  }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }

  bool consume(char c) {
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect(char c) {
    if (!consume(c)) bad(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
  }

  std::string string_literal() {
    skip_space();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) {
      bad("expected a quoted string at offset " + std::to_string(pos_));
    }
    const char quote = s_[pos_++];
    const size_t end = s_.find(quote, pos_);
    if (end == std::string_view::npos) bad("unterminated string");
    std::string out(s_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }

  bool bool_literal() {
    skip_space();
    for (const auto& [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      if (s_.substr(pos_).starts_with(word)) {
        pos_ += std::strlen(word);
        return value;
      }
    }
    bad("expected True or False for 'fortran_order'");
  }

  std::vector<int64_t> shape_literal() {
    std::vector<int64_t> shape;
    expect('(');
    while (!consume(')')) {
      skip_space();
      int64_t v = 0;
      size_t digits = 0;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, s_[pos_] - '0', &v)) {
          bad("dimension too large");
        }
        ++pos_;
        ++digits;
      }
      if (digits == 0) bad("expected a non-negative integer in 'shape'");
      if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;  // Python 2 long suffix in old files
      shape.push_back(v);
      if (!consume(',')) {
        expect(')');
        break;
      }
    }
    return shape;
  }

  std::string_view s_;
  const std::string& path_;
  size_t pos_ = 0;
};

}  // namespace

void write_npy_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  const uint64_t count = element_count(shape, path);
  if (count > 0 && data == nullptr) fail(path, "no data to write");
  if (count > std::numeric_limits<size_t>::max() / sizeof(float)) {
    fail(path, "shape " + shape_text(shape) + " is too large to write");
  }

  std::string header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_text(shape) + ", }";
  // numpy pads so the data starts on a 64-byte boundary (magic 6 + version 2 + length 2 bytes).
  const size_t unpadded = kMagic.size() + 4 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 0xffff)
    fail(path, "shape " + shape_text(shape) + " is too long for .npy v1.0");

  std::string prefix(kMagic);
  prefix += '\x01';  // version 1.0
  prefix += '\x00';
  prefix += static_cast<char>(header.size() & 0xff);
  prefix += static_cast<char>(header.size() >> 8);
  prefix += header;

  StagedFile out(path);  // a kill or failure never leaves a half-written file under `path`
  out.write(prefix.data(), prefix.size());
  out.write(data, static_cast<size_t>(count) * sizeof(float));
  out.commit();
}

NpyArray read_npy_f32(const std::string& path) {
  struct stat st {};
  const FileHandle fd = open_regular_file(path, &st);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  // Magic (6), version (2), then a 2-byte (v1) or 4-byte (v2, v3) header length.
  unsigned char pre[12] = {};
  const size_t need = std::min<uint64_t>(file_size, sizeof(pre));
  if (!read_all(fd.get(), pre, need, path) || need < 10 ||
      std::string_view(reinterpret_cast<const char*>(pre), kMagic.size()) != kMagic) {
    fail(path, "not a .npy file (expected it to start with \"\\x93NUMPY\")");
  }
  const int major = pre[6], minor = pre[7];
  size_t prefix_len = 0;
  uint64_t header_len = 0;
  if (major == 1) {
    prefix_len = 10;
    header_len = pre[8] | (uint64_t{pre[9]} << 8);
  } else if (major == 2 || major == 3) {
    if (need < 12) fail(path, "truncated .npy preamble");
    prefix_len = 12;
    header_len =
        pre[8] | (uint64_t{pre[9]} << 8) | (uint64_t{pre[10]} << 16) | (uint64_t{pre[11]} << 24);
  } else {
    fail(path, "unsupported .npy version " + std::to_string(major) + "." + std::to_string(minor) +
                   " (expected 1.0, 2.0 or 3.0)");
  }
  if (header_len > kMaxHeaderLen || prefix_len + header_len > file_size) {
    fail(path, "truncated .npy header: it claims " + std::to_string(header_len) +
                   " bytes but the file has " + std::to_string(file_size) + " in all");
  }

  std::string header_text(header_len, '\0');
  // The 12-byte read may have consumed the start of a v1 header; re-read from the right offset.
  if (::lseek(fd.get(), static_cast<off_t>(prefix_len), SEEK_SET) < 0 ||
      !read_all(fd.get(), header_text.data(), header_text.size(), path)) {
    fail(path, "cannot read the .npy header");
  }
  const auto header = HeaderParser(header_text, path).parse();

  size_t item_size = 0;
  if (header.descr == "<f4") {
    item_size = 4;
  } else if (header.descr == "<f8") {
    item_size = 8;
  } else {
    fail(path, "unsupported dtype '" + header.descr + "' (expected '<f4' or '<f8')");
  }
  // For 0-d and 1-d arrays the two orders are the same bytes, and numpy may label them either way.
  if (header.fortran_order && header.shape.size() > 1) {
    fail(path, "Fortran-order data is not supported (expected fortran_order False, C order)");
  }

  const uint64_t count = element_count(header.shape, path);
  const std::optional<uint64_t> bytes = checked_mul(count, item_size);
  if (!bytes) fail(path, "shape " + shape_text(header.shape) + " has too many elements");
  const uint64_t data_bytes = *bytes;
  const uint64_t available = file_size - prefix_len - header_len;
  const std::string expected = "shape " + shape_text(header.shape) + " of " + header.descr +
                               " needs " + std::to_string(data_bytes) + " bytes of data";
  if (available < data_bytes) {
    fail(path, "truncated data: " + expected + ", the file has " + std::to_string(available));
  }
  if (available > data_bytes) {
    fail(path, expected + ", but " + std::to_string(available - data_bytes) + " more bytes follow");
  }

  NpyArray out;
  out.shape = header.shape;
  out.data.resize(static_cast<size_t>(count));
  const std::string changed = "truncated data (the file shrank while being read)";
  if (item_size == 4) {
    if (!read_all(fd.get(), out.data.data(), static_cast<size_t>(data_bytes), path)) {
      fail(path, changed);
    }
  } else {
    // Convert through a bounded buffer so a large f8 file does not briefly need 3x its size.
    std::vector<double> chunk(std::min<uint64_t>(count, 1 << 16));
    for (size_t done = 0; done < out.data.size();) {
      const size_t n = std::min(chunk.size(), out.data.size() - done);
      if (!read_all(fd.get(), chunk.data(), n * sizeof(double), path)) fail(path, changed);
      std::transform(chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(n),
                     out.data.begin() + static_cast<std::ptrdiff_t>(done),
                     [](double v) { return static_cast<float>(v); });
      done += n;
    }
  }
  return out;
}

}  // namespace kiln
