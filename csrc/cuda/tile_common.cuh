// Building blocks shared by the kernels: dtype conversion, smem tile loads, a 32x32 dot tile,
// warp reductions. Deliberately plain SIMT code with fp32 accumulation (correctness first;
// tensor-core versions are tracked by the performance issue).
//
// Device code only: the CPU emulator (csrc/emulator/, tests/ops/test_kernels_emulated.py)
// compiles this header and the *_kernels.cuh headers with BCT_FAST_EMULATOR defined, where
// cuda_shim.h stands in for the CUDA headers. Host-side helpers live in launch_common.cuh.
#pragma once
#ifdef BCT_FAST_EMULATOR
#include "../emulator/cuda_shim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#endif

#include <cstdint>

// Dynamic shared memory is declared through this macro: `extern __shared__` has no C++
// equivalent, so the emulator substitutes a pointer to the block's dynamic smem.
#ifndef BCT_FAST_EMULATOR
#define BCT_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

// BCT_FAST_EMU_BREAK_* below inject faults for the emulator's self-test (it must catch them);
// real builds never define them.

namespace bct_fast {
namespace tile {

constexpr int kThreads = 256;  // 8 warps
constexpr int kRows = 32;      // max rows (of the "left" matrix) per tile
constexpr int kCols = 32;      // rows of the "right" matrix per tile (one per lane)
constexpr int kK = 32;         // depth of one smem stage

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// tile[r][k] = src[(row0 + r) * d + k0 + k] as fp32, zero outside [0, nrows) x [0, d).
template <typename T>
__device__ __forceinline__ void load(const T* __restrict__ src, int64_t row0, int64_t nrows,
                                     int64_t d, int64_t k0, float (*tile)[kK + 1], int tile_rows) {
  for (int e = threadIdx.x; e < tile_rows * kK; e += kThreads) {
    const int r = e / kK, k = e % kK;
    const int64_t gr = row0 + r, gk = k0 + k;
#ifdef BCT_FAST_EMU_BREAK_TAIL_OFF_BY_ONE
    tile[r][k] = (gr <= nrows && gk < d) ? to_float(src[gr * d + gk]) : 0.f;  // reads row nrows
#else
    tile[r][k] = (gr < nrows && gk < d) ? to_float(src[gr * d + gk]) : 0.f;
#endif
  }
}

// dot[i] = <a[a_row0 + rg + 8 i], b[b_row0 + lane]> over the full depth d, for rg = warp id.
// Rows past a_tile_rows are left at 0. All threads of the block must call this.
template <typename T>
__device__ __forceinline__ void dot_tile(const T* __restrict__ a, int64_t a_row0, int64_t a_rows,
                                         int a_tile_rows, const T* __restrict__ b, int64_t b_row0,
                                         int64_t b_rows, int64_t d, float (*as)[kK + 1],
                                         float (*bs)[kK + 1], float dot[kRows / 8]) {
  const int lane = threadIdx.x % 32, rg = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRows / 8; ++i) dot[i] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kK) {
    load(a, a_row0, a_rows, d, k0, as, a_tile_rows);
    load(b, b_row0, b_rows, d, k0, bs, kCols);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kK; ++k) {
      const float bv = bs[lane][k];
#pragma unroll
      for (int i = 0; i < kRows / 8; ++i) {
        const int r = rg + 8 * i;
        if (r < a_tile_rows) dot[i] = fmaf(as[r][k], bv, dot[i]);
      }
    }
#ifndef BCT_FAST_EMU_BREAK_MISSING_BARRIER
    __syncthreads();  // the next stage's loads overwrite the tiles
#endif
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace tile
}  // namespace bct_fast
