// CRC-32C (Castagnoli), the checksum of every tensor and blob header in an artifact. Hardware
// accelerated (SSE4.2) — verifying a 2.5 GB model takes well under a second.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kiln {

uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

}  // namespace kiln
