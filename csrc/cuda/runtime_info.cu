#include <cuda_runtime.h>

#include "bct_fast/runtime_info.h"

namespace bct_fast {

RuntimeInfo query_runtime_info() {
  RuntimeInfo info;
  cudaDriverGetVersion(&info.driver_version);
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaError_t err = cudaGetDeviceCount(&info.device_count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.note = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls are not poisoned
  }
  return info;
}

}  // namespace bct_fast
