// Host-side helpers shared by the launchers (the emulator's cuda_shim.h provides the CUDA
// runtime calls they make).
#pragma once
#include <cstdint>
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

// Split rules of the fused kernels (grid = row tiles x splits of whole column tiles).
// shape_splits: a split count from the shapes only (no device query, so results are reproducible
// across GPUs): about target_blocks blocks, no split shorter than min_tiles column tiles, >= 1.
inline int64_t shape_splits(int64_t row_tiles, int64_t n_tiles, int64_t target_blocks,
                            int64_t min_tiles) {
  int64_t s = (target_blocks + row_tiles - 1) / row_tiles;
  if (s > n_tiles / min_tiles) s = n_tiles / min_tiles;
  return s < 1 ? 1 : s;
}

// `splits` (>= 1) requested over n_tiles column tiles: whole tiles per split, and the splits
// actually used (trailing ones that would be empty are dropped; used <= splits).
struct Splits {
  int64_t tiles_per_split, used;
};
inline Splits whole_tile_splits(int64_t n_tiles, int64_t splits) {
  const int64_t tps = (n_tiles + splits - 1) / (splits < n_tiles ? splits : n_tiles);
  return {tps, (n_tiles + tps - 1) / tps};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The fused kernels' bf16 mma.sync and cp.async exist from sm_80 on (the emulator stands for an
// H100).
inline Status check_sm80(const char* what) {
#ifndef BCT_FAST_EMULATOR
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return check_launch(what);
  if (major < 8)
    return Status::Error(std::string(what) + ": needs a GPU of compute capability 8.0 or newer");
#else
  (void)what;
#endif
  return Status::Ok();
}

}  // namespace tile
}  // namespace bct_fast
