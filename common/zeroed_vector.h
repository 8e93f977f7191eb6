// ZeroedVector<T>: a std::vector for large buffers sized once (activations, KV caches), whose
// memory comes straight from anonymous mmap. The kernel hands out such pages zeroed on their
// first touch, so constructing one costs nothing until it is used: a 4-token prompt touches 4 rows
// of a 512-row activation buffer, a 10-token sequence a few pages of a 2048-position KV cache.
// A std::vector<T>(n) writes all n zeros at once instead — for the synthetic 1B about 130 MB
// (~33,000 first-touch page faults here) before the first token. The contents are the same: every
// element starts as zero (value-initialised), as with std::vector.
//
// Only for trivially constructible T, and only for buffers sized once: elements are constructed
// by leaving the zeros in place, so a vector shrunk and then grown again within its capacity
// would not re-zero the regrown elements.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace kiln {

template <typename T>
struct ZeroPagesAllocator {
  static_assert(std::is_trivially_default_constructible_v<T> &&
                std::is_trivially_destructible_v<T>);
  using value_type = T;

  ZeroPagesAllocator() = default;
  template <typename U>
  ZeroPagesAllocator(const ZeroPagesAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n == 0) return nullptr;
    void* p =
        ::mmap(nullptr, n * sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) noexcept {
    if (p) ::munmap(p, n * sizeof(T));
  }
  // Value-initialisation of fresh elements: the page is already zero (see the top of the file).
  template <typename U>
  void construct(U*) noexcept {}
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }

  template <typename U>
  bool operator==(const ZeroPagesAllocator<U>&) const noexcept {
    return true;
  }
};

template <typename T>
using ZeroedVector = std::vector<T, ZeroPagesAllocator<T>>;

}  // namespace kiln
