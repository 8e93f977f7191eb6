// Counting heap allocations in tests of the per-token path. alloc_counter.cpp interposes the C
// allocator itself (malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign), so
// allocations inside oneDNN, OpenMP or libstdc++ count too — and oneDNN primitive creation, which
// always allocates. Under AddressSanitizer (`tools/test --sanitize`) it counts through ASan's
// allocation hooks instead, which see the same calls. Link it into a test executable to use it.
#pragma once

#include <cstdint>

namespace kiln::test {

void start_counting_allocations();
// Stops counting and returns the number of allocator calls since start.
uint64_t stop_counting_allocations();

}  // namespace kiln::test
