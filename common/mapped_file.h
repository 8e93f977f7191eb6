// A read-only memory mapping of a whole file (RAII).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kiln {

class MappedFile {
 public:
  MappedFile() = default;
  // Throws kiln::Error naming the path if it is not a regular file (open_regular_file) or cannot
  // be mapped. An empty file maps to
  // size() == 0 and data() == nullptr.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Drops the mapping's resident pages (they stay in the page cache) so that streaming through a
  // large input does not grow the process's resident set.
  void release_pages() const;
  // The same for the pages overlapping [p, p + n) of this mapping.
  void release_range(const void* p, size_t n) const;

 private:
  static const uint8_t* map_aligned(int fd, size_t size, const std::string& path);

  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kiln
