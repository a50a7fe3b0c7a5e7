// CPU stand-in for the CUDA device built-ins and the few runtime calls the launchers make, so
// the kernels in csrc/cuda/ compile with g++ and run on the CPU (tests/ops/kernel_emulator.py).
//
// Model: blocks run one after another; the threads of a block are fibers of one OS thread that
// switch only at __syncthreads, __syncwarp and the warp collectives (cuda_shim.cpp). Because of
// that, `static` storage inside a kernel is exactly one instance per running block: that is what
// __shared__ becomes. Shared-memory accesses are checked for races by compiling the kernel
// translation unit with -fsanitize=thread and supplying our own __tsan_* hooks (no TSan runtime).
#pragma once
#ifndef BCT_FAST_EMULATOR
#error "cuda_shim.h is for the CPU emulator build only"
#endif

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

// ---- launch geometry ---------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set by the scheduler before it resumes a fiber (a plain global: all fibers share one OS thread).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// ---- qualifiers --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // one instance, reused by the blocks that run one after another
#define BCT_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(::bct_emu::dynamic_smem())

#define CUDART_INF_F __builtin_huge_valf()

namespace bct_emu {
void* dynamic_smem();  // base of the running block's dynamic shared memory
uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg, int width);
enum Collective { kSyncwarp, kShflIdx, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll };

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace bct_emu

// ---- barriers and warp collectives -------------------------------------------------------
void __syncthreads();
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  bct_emu::warp_collective(bct_emu::kSyncwarp, mask, 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return bct_emu::from_bits<T>(
      bct_emu::warp_collective(bct_emu::kShflIdx, mask, bct_emu::to_bits(v), src, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return bct_emu::from_bits<T>(
      bct_emu::warp_collective(bct_emu::kShflXor, mask, bct_emu::to_bits(v), lane_mask, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return bct_emu::from_bits<T>(bct_emu::warp_collective(
      bct_emu::kShflUp, mask, bct_emu::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return bct_emu::from_bits<T>(bct_emu::warp_collective(
      bct_emu::kShflDown, mask, bct_emu::to_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(bct_emu::warp_collective(bct_emu::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(bct_emu::warp_collective(bct_emu::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(bct_emu::warp_collective(bct_emu::kAll, mask, pred != 0, 0, 32));
}

// ---- atomics (out of line: the race check sees them as atomic, not as plain accesses) -----
int atomicAdd(int* p, int v);
unsigned atomicAdd(unsigned* p, unsigned v);
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v);
float atomicAdd(float* p, float v);
int atomicMax(int* p, int v);
int atomicMin(int* p, int v);
int atomicExch(int* p, int v);
int atomicCAS(int* p, int compare, int v);

// ---- math ------------------------------------------------------------------------------
// fmaf / expf / fmaxf / isfinite come from <math.h> (fmaf is exact; expf may differ from CUDA's
// by an ulp or two, which the margin tests' tolerance covers).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ---- fp16 / bf16: storage types with round-to-nearest-even conversions, as CUDA's ---------
namespace bct_emu {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_half_rn(float f);  // cuda_shim.cpp
float half_to_float(uint16_t h);
}  // namespace bct_emu

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) { return bct_emu::half_to_float(h.x); }
inline __half __float2half(float f) { return __half{bct_emu::float_to_half_rn(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __bfloat162float(__nv_bfloat16 b) {
  return bct_emu::bits_f32(static_cast<uint32_t>(b.x) << 16);
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u = bct_emu::f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

// ---- the runtime calls of the launchers (an emulated H100) --------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace bct_emu {
// Per-kernel facts the emulator cannot see: static smem as ptxas reports it, the opted-in limit.
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t func_set_max_dynamic_smem(const void* kernel, int bytes);
// Names a kernel for the emulator's messages and gives its static smem (ptxas's figure).
void register_kernel(const void* kernel, const std::string& name, size_t static_smem);
// Runs body() as every thread of every block of the grid (blocks in order, seeded fiber order).
void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
            void (*body)(void*), void* ctx);

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten (kernel_emulator.py) into
// `::bct_emu::launcher(kernel, "kernel", grid, block, smem, stream)(args...)`.
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    struct Ctx {
      void (*k)(P...);
      const void* args;
    };
    // Convert once to the parameter types, as a real launch copies the arguments.
    auto args = std::tuple<P...>(static_cast<P>(a)...);
    auto run = [](void* c) {
      auto* ctx = static_cast<Ctx*>(c);
      std::apply(ctx->k, *static_cast<const std::tuple<P...>*>(ctx->args));
    };
    Ctx ctx{kernel, &args};
    launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, run, &ctx);
  }
};
template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), const char* name, dim3 grid, dim3 block,
                        size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, name, grid, block, smem};
}
}  // namespace bct_emu

template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K* kernel) {
  return bct_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute, int value) {
  return bct_emu::func_set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}
