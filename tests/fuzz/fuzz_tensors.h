// Reading every tensor of an opened checkpoint, for the targets whose parser hands out pointers
// into the file: a header that passed the checks must describe bytes that are really there.
#pragma once

namespace kiln {
class Checkpoint;
}

namespace kiln::fuzz {

// Reads each tensor (of at most 2^16 elements, so one input stays fast) whole and its first and
// last slices on axis 0 and on its last axis, as unrolling does.
void read_every_tensor(const Checkpoint& checkpoint);

}  // namespace kiln::fuzz
