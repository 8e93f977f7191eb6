// Errors that cross module boundaries. Library code throws these on bad input; only the `kiln`
// program turns them into exit codes (Error → 1, UsageError → 2).
#pragma once

#include <stdexcept>
#include <string>

namespace kiln {

// Bad input: a file, key, shape or value that is not what was expected. The message is one line
// naming the input and the expectation.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A call that does not fit the current state of the object it is made on (a decode slot that is
// busy or not in use, an adapter that is not loaded or still in use), as opposed to bad input. The
// C API reports it as KILN_ERROR_STATE.
class StateError : public Error {
 public:
  using Error::Error;
};

// Bad command-line usage (unknown flag, missing argument).
class UsageError : public Error {
 public:
  using Error::Error;
};

}  // namespace kiln
