// Tiny kernels with known defects (and their correct twins) that show each check of the
// emulator fires: run by `op selftest` of the driver (tests/ops/test_kernels_emulated.py).
// Compiled like the real kernels (-fsanitize=thread hooks, between the smem markers).
#include <cstring>
#include <string>

#include "cuda_shim.h"

namespace {

constexpr int kThreads = 64;  // two warps

__device__ unsigned gid() { return blockIdx.x * blockDim.x + threadIdx.x; }

// Lanes 0..15 of warp 1 wait in __syncwarp for lanes 16..31, which wait at __syncthreads.
__global__ void deadlock(int* out) {
  if (threadIdx.x >= 32 && threadIdx.x < 48) __syncwarp();
  __syncthreads();
  out[gid()] = 1;
}

// Warp 0 and warp 1 wait at different __syncthreads.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[gid()] = 1;
}

// Lanes 16..31 return; the others shuffle with a full mask.
__global__ void shuffle_exited_lane(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[gid()] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Lane 0 writes a word that lane 5 reads: ordered only by the __syncwarp (when `sync`).
template <bool sync>
__global__ void warp_handoff(int* out) {
  __shared__ int word[32];
  if (threadIdx.x == 0) word[0] = 42;
  if (sync) __syncwarp();
  if (threadIdx.x == 5) out[blockIdx.x] = word[0];
}

// Thread 1 reads what thread 2 overwrites, with no barrier in between.
__global__ void write_after_read(int* out) {
  __shared__ int word[1];
  if (threadIdx.x == 0) word[0] = 1;
  __syncthreads();
  if (threadIdx.x == 1) out[blockIdx.x] = word[0];
  if (threadIdx.x == 2) word[0] = 2;
}

// Correct: one writer, a barrier, every thread reads; then atomics from every thread.
__global__ void broadcast_and_atomics(int* out) {
  __shared__ int word[2];
  if (threadIdx.x == 0) {
    word[0] = 7;
    word[1] = 0;
  }
  __syncthreads();
  atomicAdd(&word[1], word[0]);
  __syncthreads();
  out[gid()] = word[1];
}

// Reads a word no thread wrote in this block (the dead store keeps g++ from folding the read
// of a never-written static to 0).
__global__ void uninitialised_read(int* out) {
  __shared__ int word[1];
  if (threadIdx.x == kThreads) word[0] = 1;
  out[gid()] = word[0];
}

// Dynamic smem: every thread writes its own word, then reads its neighbour's after a barrier.
__global__ void dynamic_smem_kernel(int* out) {
  BCT_DYNAMIC_SMEM(int, buf);
  buf[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[gid()] = buf[(threadIdx.x + 1) % kThreads];
}

template <typename K>
void reg(K* kernel, const char* name) {
  bct_emu::register_kernel(reinterpret_cast<const void*>(kernel), name, 0);
}

}  // namespace

// Runs the named case; returns the launch's cudaError_t (0 = launched).
int bct_emu_selftest(const std::string& name, int* out) {
  reg(deadlock, "deadlock");
  reg(divergent_barrier, "divergent_barrier");
  reg(shuffle_exited_lane, "shuffle_exited_lane");
  reg(warp_handoff<true>, "warp_handoff<true>");
  reg(warp_handoff<false>, "warp_handoff<false>");
  reg(write_after_read, "write_after_read");
  reg(broadcast_and_atomics, "broadcast_and_atomics");
  reg(uninitialised_read, "uninitialised_read");
  reg(dynamic_smem_kernel, "dynamic_smem_kernel");
  const dim3 grid(2), block(kThreads);
  size_t smem = 0;
  if (name == "deadlock") bct_emu::launcher(deadlock, "", grid, block)(out);
  if (name == "divergent_barrier") bct_emu::launcher(divergent_barrier, "", grid, block)(out);
  if (name == "shuffle_exited_lane") bct_emu::launcher(shuffle_exited_lane, "", grid, block)(out);
  if (name == "warp_sync_ok") bct_emu::launcher(warp_handoff<true>, "", grid, block)(out);
  if (name == "warp_sync_missing") bct_emu::launcher(warp_handoff<false>, "", grid, block)(out);
  if (name == "write_after_read") bct_emu::launcher(write_after_read, "", grid, block)(out);
  if (name == "broadcast_and_atomics")
    bct_emu::launcher(broadcast_and_atomics, "", grid, block)(out);
  if (name == "uninitialised_read") bct_emu::launcher(uninitialised_read, "", grid, block)(out);
  if (name.rfind("dynamic_smem_", 0) == 0) {
    // dynamic_smem_<bytes>[_optin]: the launch must refuse > 48 KiB unless opted in.
    smem = std::stoul(name.substr(13));
    if (name.find("_optin") != std::string::npos &&
        cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return cudaGetLastError();
    bct_emu::launcher(dynamic_smem_kernel, "", grid, block, smem)(out);
  }
  return cudaGetLastError();
}
