// CRC-32C (Castagnoli), the checksum of every tensor, blob header and the manifest of an artifact.
// Hardware accelerated (SSE4.2, three interleaved streams on large inputs); crc32c_combine lets a
// large buffer be checksummed in pieces on several threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kiln {

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// The CRC-32C of A followed by B, from crc32c(A), crc32c(B) and B's length in bytes (zlib's
// crc32_combine for the Castagnoli polynomial). Costs O(log len_b), independent of the data.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace kiln
