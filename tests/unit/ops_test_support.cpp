#include "tests/unit/ops_test_support.h"

#include <atomic>
#include <cstdlib>
#include <new>

// ---- allocation counter: the kernels and Sampler::sample promise not to allocate -------------
// Replaces the global operator new for the whole ops_tests executable (sampling_test.cpp reads
// the counter through kiln_test_allocations()).
namespace {
std::atomic<uint64_t> g_allocations{0};
}
uint64_t kiln_test_allocations() {
  return g_allocations.load();
}
void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, size_t) noexcept {
  std::free(p);
}
