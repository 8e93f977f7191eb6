#include "tests/unit/alloc_counter.h"

#include <atomic>
#include <cstddef>

namespace {
std::atomic<bool> g_counting{false};
std::atomic<uint64_t> g_allocs{0};
void note() {
  if (g_counting.load(std::memory_order_relaxed)) g_allocs.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

namespace kiln::test {

void start_counting_allocations() {
  g_allocs = 0;
  g_counting = true;
}

uint64_t stop_counting_allocations() {
  g_counting = false;
  return g_allocs.load();
}

}  // namespace kiln::test

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KILN_ALLOC_COUNTER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KILN_ALLOC_COUNTER_SANITIZER 1
#endif
#endif

#ifdef KILN_ALLOC_COUNTER_SANITIZER
// Under AddressSanitizer or ThreadSanitizer the allocator is the sanitizer's own, and a malloc
// defined here would hand it memory it never allocated (and run before it is initialised). The
// sanitizer calls these hooks for every allocation it serves instead: malloc, calloc, realloc, the
// aligned forms and operator new alike.
extern "C" int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void*,
                                                                             size_t),
                                                         void (*free_hook)(const volatile void*));

namespace {
void on_malloc(const volatile void*, size_t) {
  note();
}
void on_free(const volatile void*) {}  // the sanitizer installs no hook pair with a null half
[[maybe_unused]] const int g_hooks_installed =
    __sanitizer_install_malloc_and_free_hooks(on_malloc, on_free);
}  // namespace

#else
// glibc exports its allocator implementations under these names.
extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
}

extern "C" {
void* malloc(size_t n) {
  note();
  return __libc_malloc(n);
}
void* calloc(size_t a, size_t b) {
  note();
  return __libc_calloc(a, b);
}
void* realloc(void* p, size_t n) {
  note();
  return __libc_realloc(p, n);
}
int posix_memalign(void** out, size_t align, size_t n) {
  note();
  *out = __libc_memalign(align, n);
  return *out ? 0 : 12;  // ENOMEM
}
void* aligned_alloc(size_t align, size_t n) {
  note();
  return __libc_memalign(align, n);
}
void* memalign(size_t align, size_t n) {
  note();
  return __libc_memalign(align, n);
}
}
#endif
