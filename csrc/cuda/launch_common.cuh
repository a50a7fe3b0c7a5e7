// Host-side helpers shared by the launchers (the emulator's cuda_shim.h provides the CUDA
// runtime calls they make).
#pragma once
#include <string>

#include "bct_fast/common.h"
#include "tile_common.cuh"  // CUDA runtime headers, or cuda_shim.h in the emulator

namespace bct_fast {
namespace tile {

// Largest dynamic shared memory one block may opt into on the current device.
inline int max_dynamic_smem(int static_bytes) {
  int dev = 0, optin = 48 * 1024;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return optin - static_bytes;
}

inline Status check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::Error(std::string(what) + ": " + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace tile
}  // namespace bct_fast
