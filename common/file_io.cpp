#include "common/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "common/error.h"

namespace kiln {

FileHandle::~FileHandle() {
  if (fd_ >= 0) ::close(fd_);
}

FileHandle::FileHandle(FileHandle&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}

FileHandle& FileHandle::operator=(FileHandle&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

std::string file_type_name(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "not a file";
}

namespace {

[[noreturn]] void not_regular(const std::string& path, mode_t mode) {
  throw Error(path + ": not a regular file (" + file_type_name(mode) + ")");
}

}  // namespace

FileHandle open_regular_file(const std::string& path, struct stat* out) {
  struct stat st {};
  // Checked before opening, so that no device is ever opened (opening one can act on it).
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) not_regular(path, st.st_mode);
  // O_NONBLOCK: a FIFO swapped in after the check must not block the open waiting for a writer;
  // the check on the descriptor below refuses it. Regular files ignore the flag.
  FileHandle fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  if (::fstat(fd.get(), &st) != 0) throw Error(path + ": cannot stat: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) not_regular(path, st.st_mode);
  if (out) *out = st;
  return fd;
}

std::string read_whole_file(const std::string& path) {
  struct stat st {};
  const FileHandle fd = open_regular_file(path, &st);
  std::string out;
  // The size is only a hint: the file may change while it is read (and /proc files claim 0).
  out.reserve(size_t(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(path + ": read failed: " + std::strerror(errno));
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

}  // namespace kiln
