// Monotonic time for measurements (start-up phases, tokens/s).
#pragma once

#include <chrono>

namespace kiln {

// Seconds since an arbitrary fixed point (monotonic).
inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace kiln
