// The errors a caller of the wan_rt C++ library can act on. Each message is one line naming the
// problem and, where there is one, the command that fixes it (the same words as `wan-rt run`).
#pragma once

#include <stdexcept>
#include <string>

namespace wan_rt {

// A bad request or input (size, image, output path): the CLI prints it and exits 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An engines dir that cannot serve: missing, built by another torch or for another CPU, incomplete,
// not an AOTInductor build. The CLI prints it and exits 2.
class StaleEngineError : public UsageError {
 public:
  using UsageError::UsageError;
};

// The step callback asked to stop: thrown at the step boundary, nothing is decoded.
class GenerationInterrupted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace wan_rt
