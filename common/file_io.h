// Opening input files: only regular files are read. A FIFO, device, socket or directory given
// where kiln expects a file is refused by name instead of blocking (a FIFO without a writer) or
// streaming forever (/dev/zero).
#pragma once

#include <sys/stat.h>

#include <string>

namespace kiln {

// An open file descriptor, closed when the handle goes.
class FileHandle {
 public:
  FileHandle() = default;
  explicit FileHandle(int fd) : fd_(fd) {}
  ~FileHandle();
  FileHandle(FileHandle&& o) noexcept;
  FileHandle& operator=(FileHandle&& o) noexcept;
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;

  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

// "a FIFO", "a directory", "a character device", … for the file type bits of `mode`.
std::string file_type_name(mode_t mode);

// Opens `path` read-only if it is a regular file and fills `st` (if given) with its status.
// Throws kiln::Error "PATH: cannot open: REASON" or "PATH: not a regular file (a FIFO)"; never
// blocks on a FIFO and never opens a device (nor anything swapped in between the check and the
// open).
FileHandle open_regular_file(const std::string& path, struct stat* st = nullptr);

// The whole contents of the regular file `path` (errors as open_regular_file, plus
// "PATH: read failed: REASON").
std::string read_whole_file(const std::string& path);

}  // namespace kiln
