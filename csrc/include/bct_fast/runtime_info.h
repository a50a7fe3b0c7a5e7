// CUDA runtime facts for build_info(): driver version and visible device count.
#pragma once
#include <string>

namespace bct_fast {

struct RuntimeInfo {
  int driver_version = 0;   // 0 when no driver is installed
  int runtime_version = 0;  // the statically linked cudart
  int device_count = 0;     // 0, not an error, on machines without a GPU
  std::string note;         // why the count is 0, when it is
};

RuntimeInfo query_runtime_info();

}  // namespace bct_fast
