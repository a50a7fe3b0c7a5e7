// The total order of top-k entries shared by the top-k kernels (topk_epilogue_kernels.cuh,
// topk_fused_kernels.cuh), so both apply the contract's tie rule (topk_epilogue.h) identically.
//
// Every entry is a 64-bit composite: the order-preserving uint32 image of its fp32 score in the
// high word and 2^32 - 1 - o in the low word, o = its position in the running list (o < k) or
// k + j for chunk column j. Larger composite = better; equal scores go to the lower o, i.e. the
// lower gallery index (list entries are below the chunk's n0). All composites of a row are
// distinct, and 0 is below every real one (padding).
#pragma once
#include <cstdint>
#include <cstring>

#include "tile_common.cuh"  // CUDA headers, or the emulator's shim

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header
namespace topk_order {

// The bits of a float and back (memcpy: no aliasing issue; nvcc turns it into a register move).
template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// Order-preserving image of a finite, non-negative-zero score (larger score -> larger key; every
// finite score maps above 0, so 0 can pad the sort).
__device__ __forceinline__ uint32_t key_of(float v) {
  const uint32_t u = bit_cast<uint32_t>(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float value_of(uint32_t key) {
  return bit_cast<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// BCT_FAST_EMU_BREAK_TIE_ORDER (emulator self-test only) sends ties to the higher index, in
// every kernel that uses this header: their tie tests must fail.
__device__ __forceinline__ uint64_t composite(uint32_t key, uint32_t order) {
#ifdef BCT_FAST_EMU_BREAK_TIE_ORDER
  return (static_cast<uint64_t>(key) << 32) | order;
#else
  return (static_cast<uint64_t>(key) << 32) | (0xffffffffu - order);
#endif
}
__device__ __forceinline__ uint32_t order_of(uint64_t c) {
#ifdef BCT_FAST_EMU_BREAK_TIE_ORDER
  return static_cast<uint32_t>(c);
#else
  return 0xffffffffu - static_cast<uint32_t>(c);
#endif
}

}  // namespace topk_order
}  // namespace
}  // namespace bct_fast
