// Ctrl-C during long work (export, calibration). The signal handler only sets a flag; long loops
// call throw_if_interrupted() between units of work, which throws kiln::Interrupted so that the
// ordinary RAII clean-up runs (an interrupted export leaves no temporary directory behind).
#pragma once

#include <string>

#include "common/error.h"

namespace kiln {

class Interrupted : public Error {
 public:
  using Error::Error;
};

// Installs the SIGINT/SIGTERM handler (idempotent).
void install_interrupt_handler();
bool interrupted();
// Forgets a received signal (tests, or a caller that handled it).
void clear_interrupted();
// Throws Interrupted("<what>: interrupted") once a signal arrived.
void throw_if_interrupted(const char* what);

}  // namespace kiln
