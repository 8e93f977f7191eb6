#include "common/mapped_file.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "common/error.h"
#include "common/file_io.h"

namespace kiln {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  struct stat st {};
  const FileHandle fd = open_regular_file(path, &st);
  size_ = size_t(st.st_size);
  if (size_ > 0) data_ = map_aligned(fd.get(), size_, path);
}

// At a 2 MiB-aligned address: where the page cache holds the file in 2 MiB folios (ext4 builds
// them from 2 MiB writes, or on reading through a huge-page-advised mapping), each is then mapped
// by one page-table entry: one fault instead of 512 on first touch, no TLB misses when streaming
// (docs/performance.md, "Start-up"). Smaller files are mapped where the kernel puts them.
const uint8_t* MappedFile::map_aligned(int fd, size_t size, const std::string& path) {
  constexpr size_t kHuge = size_t(2) << 20;
  if (size < kHuge) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) throw Error(path + ": cannot mmap: " + std::strerror(errno));
    return static_cast<const uint8_t*>(p);
  }
  // Reserve size + 2 MiB of address space, map the file over its aligned part, return the rest.
  void* area = ::mmap(nullptr, size + kHuge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (area == MAP_FAILED) throw Error(path + ": cannot mmap: " + std::strerror(errno));
  const uintptr_t start = reinterpret_cast<uintptr_t>(area);
  const uintptr_t aligned = (start + kHuge - 1) & ~(kHuge - 1);
  void* p =
      ::mmap(reinterpret_cast<void*>(aligned), size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::munmap(area, size + kHuge);
    throw Error(path + ": cannot mmap: " + std::strerror(err));
  }
  if (aligned > start) ::munmap(area, aligned - start);
  const uintptr_t end = start + size + kHuge, used = aligned + ((size + 4095) & ~size_t(4095));
  if (end > used) ::munmap(reinterpret_cast<void*>(used), end - used);
  // Lets a read fault on a file not yet cached bring it in as 2 MiB folios; failure (THP off)
  // only means small pages.
  ::madvise(p, size, MADV_HUGEPAGE);
  return static_cast<const uint8_t*>(p);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    path_ = std::move(o.path_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void MappedFile::release_range(const void* p, size_t n) const {
  static const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  uintptr_t lo = reinterpret_cast<uintptr_t>(data_), hi = lo + size_;
  begin = std::max(begin, lo);
  end = std::min(end, hi);
  if (begin < end) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

void MappedFile::release_pages() const {
  if (data_) ::madvise(const_cast<uint8_t*>(data_), size_, MADV_DONTNEED);
}

}  // namespace kiln
