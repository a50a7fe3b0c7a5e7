// Shared definitions for the bct_fast launchers. No Python, no torch: launchers take raw
// device pointers, sizes, a dtype code and the caller's cudaStream_t.
#pragma once
#include <cstdint>
#include <string>

namespace bct_fast {

// Element type of the embedding / weight / gallery inputs. Accumulation is always fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Result of a launch: empty message on success, else a human-readable reason.
struct Status {
  std::string error;
  bool ok() const { return error.empty(); }
  static Status Ok() { return {}; }
  static Status Error(std::string msg) { return {std::move(msg)}; }
};

}  // namespace bct_fast
