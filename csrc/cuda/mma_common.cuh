// Thin wrappers of the sm_80 warp-level tensor-core and async-copy instructions used by the fused
// kernels (margin_fused_kernels.cuh, topk_fused_kernels.cuh), and the fragment addressing and
// tile loader they share (end of file):
//   mma_m16n8k16_bf16   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (D += A B, in place)
//   ldmatrix_x4         ldmatrix.sync.aligned.m8n8.x4.shared.b16
//   ldmatrix_x4_trans   ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16
//   pack_bf16x2         cvt.rn.bf16x2.f32 (two fp32 -> one bf16x2 register, first argument low)
//   cp_async_16         cp.async.cg.shared.global [dst], [src], 16, src_size  (zero-fills the rest)
//   cp_async_commit / cp_async_wait<N>   cp.async.commit_group / cp.async.wait_group N
//
// Real builds: inline PTX (needs sm_80; an older target traps). The emulator build
// (BCT_FAST_EMULATOR) gets C++ versions that give every lane the register contents the PTX ISA
// documents, exchanging fragments between lanes only through the emulator's warp collectives, so
// a kernel's fragment plumbing (addresses, register order) is checked against the documented
// layouts. These emulations, and the per-lane addressing below, are compared with CUTLASS/CuTe's
// layouts (tests/ops/test_fragment_layouts_cute.py), a second reading that CUTLASS runs on
// hardware; the bf16x2 half order of cvt matches CUTLASS's NumericArrayConverter<bfloat16_t,
// float, 2> by reading only. None of it has met a GPU yet: the first GPU run should execute
// margin_fused_mma_tile_check and margin_fused_pv_tile_check (margin_fused.h).
//
// Layouts used (PTX ISA 9.x, "Matrix Fragments for mma.m16n8k16 with floating point type",
// .f16/.bf16; and "Warp-level matrix load instruction: ldmatrix"), with
// g = laneid >> 2 (groupID), t = laneid % 4 (threadID_in_group), elements low half first:
//   A (16x16, row): a0,a1 -> (g,    2t..2t+1)   a2,a3 -> (g+8, 2t..2t+1)     [register 0, 1]
//                   a4,a5 -> (g,  2t+8..2t+9)   a6,a7 -> (g+8, 2t+8..2t+9)   [register 2, 3]
//   B (16x8, col):  b0,b1 -> (k = 2t..2t+1, n = g)   b2,b3 -> (k = 2t+8..2t+9, n = g)
//   C/D (16x8 f32): c0,c1 -> (g, 2t..2t+1)   c2,c3 -> (g+8, 2t..2t+1)
//   ldmatrix .x4: lanes 8i..8i+7 give the 8 row addresses (16 bytes each, 16-byte aligned) of
//   matrix i; register i of lane l receives row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i.
//   ldmatrix .x4.trans: same row addresses; register i of lane l receives element l/4 of rows
//   2(l%4) (low half) and 2(l%4)+1 (high half) of matrix i, i.e. the transposed 8x8 matrix.
//   So for a 16 x 8 B operand stored row-major as [k][n] (n contiguous), .trans of the two 8x8
//   blocks k 0-7 and k 8-15 gives b0,b1 and b2,b3 of the B fragment above.
//   C -> A reuse: the C fragments T0 (columns 0-7) and T1 (columns 8-15) of one m16 row block,
//   packed as {T0.c0c1, T0.c2c3, T1.c0c1, T1.c2c3} (c_to_a), are the A fragment of that 16 x 16
//   block with the C columns as k (FA2's convert_layout_acc_Aregs).
#pragma once
#include <cstdint>

#include "tile_common.cuh"  // CUDA headers, or the emulator's shim

#ifdef BCT_FAST_EMULATOR
#include "../emulator/emu_host.h"  // bct_emu::fail
#endif

// BCT_FAST_EMU_BREAK_MMA_LAYOUT (emulator self-test only) swaps A registers 1 and 2 in the
// emulated mma: the fragment check (tests/ops/test_fused_emulated.py) must then fail.
// BCT_FAST_EMU_BREAK_PACK_HALVES (emulator self-test only) swaps the two halves of the emulated
// pack_bf16x2: the PV tile check and the fused pws (tests/ops/test_fused_pws_emulated.py) must
// then fail.

namespace bct_fast {
namespace mma {

#ifndef BCT_FAST_EMULATOR
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define BCT_FAST_MMA_UNSUPPORTED 1  // bf16 mma and cp.async need sm_80
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a * b for one m16n8k16 tile (fragments as documented above).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#ifdef BCT_FAST_MMA_UNSUPPORTED
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// `row` is this lane's row address (see the layout above). The "memory" clobber keeps the
// compiler from moving plain shared-memory stores across it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef BCT_FAST_MMA_UNSUPPORTED
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
#endif
}

// ldmatrix .x4 .trans (layout above): `row` is this lane's row address, as for ldmatrix_x4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef BCT_FAST_MMA_UNSUPPORTED
  __trap();
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row))
               : "memory");
#endif
}

// {lo, hi} rounded to nearest-even bf16, lo in the low half. cvt's first source goes to the
// upper half, hence (hi, lo).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#ifdef BCT_FAST_MMA_UNSUPPORTED
  __trap();
  return 0;
#else
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// Copies src_bytes (0..16) bytes from global src to shared dst and zero-fills the rest of the 16;
// both addresses 16-byte aligned. src must be a valid address even when src_bytes is 0.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef BCT_FAST_MMA_UNSUPPORTED
  __trap();
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef BCT_FAST_MMA_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight. Other threads
// see the data only after a barrier.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef BCT_FAST_MMA_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#else  // BCT_FAST_EMULATOR ------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

inline unsigned lane_id() {
  return ((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % 32;
}
inline float bf16_lo(uint32_t r) { return bct_emu::bits_f32(r << 16); }
inline float bf16_hi(uint32_t r) { return bct_emu::bits_f32(r & 0xffff0000u); }
inline uint64_t pack(uint32_t lo, uint32_t hi) { return lo | (static_cast<uint64_t>(hi) << 32); }

// Every lane gathers the two rows of A (g, g+8) and the two columns of B (2t, 2t+1) that its
// four accumulators need, 16 64-bit shuffles, then computes them. Products of bf16 are exact in
// double and the sum of 16 of them plus c is rounded once to fp32; the hardware's internal
// accumulation order / rounding may differ from that by an ulp or so.
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a_in)[4], const uint32_t (&b)[2]) {
  uint32_t a[4] = {a_in[0], a_in[1], a_in[2], a_in[3]};
#ifdef BCT_FAST_EMU_BREAK_MMA_LAYOUT
  const uint32_t tmp = a[1];
  a[1] = a[2];
  a[2] = tmp;
#endif
  const unsigned lane = lane_id(), g = lane / 4, t = lane % 4;
  float arow[2][16], bcol[2][16];  // arow[h][k] = A(g + 8h, k); bcol[j][k] = B(k, 2t + j)
  for (unsigned q = 0; q < 4; ++q) {
    // Lane 4g + q holds A(g, 2q..2q+1) in a0, A(g+8, 2q..) in a1, A(g, 2q+8..) in a2, A(g+8, 2q+8..) in a3.
    const uint64_t r01 = __shfl_sync(kFullMask, pack(a[0], a[1]), static_cast<int>(4 * g + q));
    const uint64_t r23 = __shfl_sync(kFullMask, pack(a[2], a[3]), static_cast<int>(4 * g + q));
    const uint32_t r0 = static_cast<uint32_t>(r01), r1 = static_cast<uint32_t>(r01 >> 32);
    const uint32_t r2 = static_cast<uint32_t>(r23), r3 = static_cast<uint32_t>(r23 >> 32);
    arow[0][2 * q] = bf16_lo(r0), arow[0][2 * q + 1] = bf16_hi(r0);
    arow[1][2 * q] = bf16_lo(r1), arow[1][2 * q + 1] = bf16_hi(r1);
    arow[0][2 * q + 8] = bf16_lo(r2), arow[0][2 * q + 9] = bf16_hi(r2);
    arow[1][2 * q + 8] = bf16_lo(r3), arow[1][2 * q + 9] = bf16_hi(r3);
  }
  for (unsigned q = 0; q < 4; ++q) {
    for (unsigned j = 0; j < 2; ++j) {
      // Lane 4n + q holds B(2q..2q+1, n) in b0 and B(2q+8..2q+9, n) in b1.
      const uint64_t v = __shfl_sync(kFullMask, pack(b[0], b[1]), static_cast<int>(4 * (2 * t + j) + q));
      const uint32_t v0 = static_cast<uint32_t>(v), v1 = static_cast<uint32_t>(v >> 32);
      bcol[j][2 * q] = bf16_lo(v0), bcol[j][2 * q + 1] = bf16_hi(v0);
      bcol[j][2 * q + 8] = bf16_lo(v1), bcol[j][2 * q + 9] = bf16_hi(v1);
    }
  }
  for (int i = 0; i < 4; ++i) {  // d_i: row g + 8 (i / 2), column 2t + (i % 2)
    double s = d[i];
    for (int k = 0; k < 16; ++k)
      s += static_cast<double>(arow[i / 2][k]) * static_cast<double>(bcol[i % 2][k]);
    d[i] = static_cast<float>(s);
  }
}

// Each lane learns the row address of the lane that holds its element's row (one pointer
// shuffle per matrix) and reads its own 4 bytes, so the race check sees the actual readers.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned lane = lane_id();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    bct_emu::fail("ldmatrix: lane %u gives a row address that is not 16-byte aligned", lane);
  for (unsigned i = 0; i < 4; ++i) {
    const char* src = __shfl_sync(kFullMask, static_cast<const char*>(row), static_cast<int>(8 * i + lane / 4));
    r[i] = *reinterpret_cast<const uint32_t*>(src + 4 * (lane % 4));
  }
}

// .trans: register i of lane l = element l/4 of rows 2(l%4), 2(l%4)+1 of matrix i (two 2-byte
// reads at the row addresses of lanes 8i + 2(l%4) and 8i + 2(l%4) + 1).
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned lane = lane_id();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    bct_emu::fail("ldmatrix.trans: lane %u gives a row address that is not 16-byte aligned", lane);
  for (unsigned i = 0; i < 4; ++i) {
    const int src_lane = static_cast<int>(8 * i + 2 * (lane % 4));
    const char* lo = __shfl_sync(kFullMask, static_cast<const char*>(row), src_lane);
    const char* hi = __shfl_sync(kFullMask, static_cast<const char*>(row), src_lane + 1);
    const uint32_t l16 = *reinterpret_cast<const uint16_t*>(lo + 2 * (lane / 4));
    const uint32_t h16 = *reinterpret_cast<const uint16_t*>(hi + 2 * (lane / 4));
    r[i] = l16 | (h16 << 16);
  }
}

inline uint32_t bf16_round_bits(float f) {  // round to nearest even; NaN stays a quiet NaN
  uint32_t u = bct_emu::f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

inline uint32_t pack_bf16x2(float lo, float hi) {
#ifdef BCT_FAST_EMU_BREAK_PACK_HALVES
  const float tmp = lo;
  lo = hi;
  hi = tmp;
#endif
  return bf16_round_bits(lo) | (bf16_round_bits(hi) << 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  return bct_emu::bits_f32(static_cast<uint32_t>(b) << 16);
}

// cp.async as a deferred copy: at issue the destination is overwritten with 0xff (NaN as bf16)
// and the data is read from global; the data lands only when cp_async_wait retires its group.
// Both writes are the issuing thread's and go through the race check, so reading a stage before
// its wait + barrier sees NaNs or a race, and overwriting a stage others still read is a race.
struct CpAsyncOp {
  uint32_t* dst;
  uint32_t data[4];
  uint64_t group;
};
struct CpAsyncThread {
  static constexpr int kMaxPending = 64;
  CpAsyncOp ops[kMaxPending];
  int n = 0;
  uint64_t committed = 0;  // groups committed so far; ops of the open group carry this number
  unsigned bx = 0, by = 0, bz = 0;  // block of the pending ops
};
// Thread-local, not `static`: the kernel objects' .bss is shared memory to the emulator (poisoned
// before each block); all fibers run on one OS thread, so this is one array for the process.
inline thread_local CpAsyncThread* tl_cp_async = nullptr;

inline CpAsyncThread& cp_async_state() {
  if (tl_cp_async == nullptr) tl_cp_async = new CpAsyncThread[1024];
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  CpAsyncThread& s = tl_cp_async[t];
  if (s.n > 0 && (s.bx != blockIdx.x || s.by != blockIdx.y || s.bz != blockIdx.z))
    bct_emu::fail("cp.async: thread %u of block (%u,%u,%u) exited with %d copies in flight", t,
                  s.bx, s.by, s.bz, s.n);
  s.bx = blockIdx.x, s.by = blockIdx.y, s.bz = blockIdx.z;
  return s;
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    bct_emu::fail("cp.async: %s address not 16-byte aligned",
                  reinterpret_cast<uintptr_t>(dst) % 16 != 0 ? "shared" : "global");
  if (src_bytes < 0 || src_bytes > 16) bct_emu::fail("cp.async: src-size %d", src_bytes);
  CpAsyncThread& s = cp_async_state();
  if (s.n == CpAsyncThread::kMaxPending) bct_emu::fail("cp.async: too many copies in flight");
  CpAsyncOp& op = s.ops[s.n++];
  op.dst = static_cast<uint32_t*>(dst);
  op.group = s.committed;
  unsigned char bytes[16] = {};
  for (int i = 0; i < src_bytes; ++i) bytes[i] = static_cast<const unsigned char*>(src)[i];
  for (int j = 0; j < 4; ++j)
    op.data[j] = bytes[4 * j] | (bytes[4 * j + 1] << 8) | (bytes[4 * j + 2] << 16) |
                 (static_cast<uint32_t>(bytes[4 * j + 3]) << 24);
  for (int j = 0; j < 4; ++j) op.dst[j] = 0xffffffffu;  // in flight: undefined contents
}

inline void cp_async_commit() { ++cp_async_state().committed; }

template <int N>
inline void cp_async_wait() {
  CpAsyncThread& s = cp_async_state();
  int keep = 0;
  for (int i = 0; i < s.n; ++i) {
    CpAsyncOp& op = s.ops[i];
    if (op.group + N < s.committed) {  // an older group than the N most recent: done
      for (int j = 0; j < 4; ++j) op.dst[j] = op.data[j];
    } else {
      s.ops[keep++] = op;
    }
  }
  s.n = keep;
}

#endif  // BCT_FAST_EMULATOR

// ---- fragment addressing and tile loading shared by the fused kernels ------------------------
// Per-lane offsets of the ldmatrix row addresses (layouts above).
// A, 16 rows x 16 depth: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15) = registers a0a1, a2a3, a4a5, a6a7 of the mma.
__device__ __forceinline__ int a_ld_row(int lane) { return lane % 16; }
__device__ __forceinline__ int a_ld_col(int lane) { return 8 * (lane / 16); }
// B = rows of the "column" operand (w, or the gallery; depth k contiguous), two n8 tiles x 16
// depth: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0b1,
// b2b3 of tile 0, then of tile 1.
__device__ __forceinline__ int b_ld_row(int lane) { return lane % 8 + 8 * (lane / 16); }
__device__ __forceinline__ int b_ld_col(int lane) { return 8 * ((lane / 8) % 2); }
// Accumulator i of a lane: row g + 8 (i / 2), column 2t + i % 2 of the m16n8 tile.
__device__ __forceinline__ int acc_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
__device__ __forceinline__ int acc_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }
// B from a row-major [k][n] tile (n contiguous) through ldmatrix_x4_trans, two n8 tiles x 16
// depth: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) = b0b1,
// b2b3 of tile 0, then of tile 1 (the same register order as b_ld_row / b_ld_col).
__device__ __forceinline__ int bt_ld_row(int lane) { return lane % 8 + 8 * ((lane / 8) % 2); }
__device__ __forceinline__ int bt_ld_col(int lane) { return 8 * (lane / 16); }

// C -> A: the C fragments t0 (columns 0-7) and t1 (columns 8-15) of one m16 block as the A
// fragment of the 16 x 16 block (columns = k), rounded to bf16 (layouts above).
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&t0)[4], const float (&t1)[4]) {
  a[0] = pack_bf16x2(t0[0], t0[1]);
  a[1] = pack_bf16x2(t0[2], t0[3]);
  a[2] = pack_bf16x2(t1[0], t1[1]);
  a[3] = pack_bf16x2(t1[2], t1[3]);
}

// acc += A B^T for one warp over a kBK-deep slice: A = kMI * 16 rows at `a`, B = kNI * 8 rows at
// `b` (shared memory, row pitch kLd bf16 elements, depth contiguous); acc[mi][ni] is the m16n8
// tile (mi, ni) in the C/D layout above.
template <int kMI, int kNI, int kBK, int kLd>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[kMI][kNI][4], const uint16_t* a,
                                              const uint16_t* b, int lane) {
  static_assert(kBK % 16 == 0 && kNI % 2 == 0, "ldmatrix.x4 covers 16 of depth and two n8 tiles");
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t af[kMI][4], bfr[kNI / 2][4];
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
      ldmatrix_x4(af[mi], a + (mi * 16 + a_ld_row(lane)) * kLd + kk + a_ld_col(lane));
#pragma unroll
    for (int p = 0; p < kNI / 2; ++p)
      ldmatrix_x4(bfr[p], b + (p * 16 + b_ld_row(lane)) * kLd + kk + b_ld_col(lane));
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) {
        const uint32_t b2[2] = {bfr[ni / 2][2 * (ni % 2)], bfr[ni / 2][2 * (ni % 2) + 1]};
        mma_m16n8k16_bf16(acc[mi][ni], af[mi], b2);
      }
  }
}

// One depth slice of a tile, by kThreads threads:
// dst[r * kLd + k] = src[(row0 + r) * d + k0 + k] for r < kRows, k < kBK (bf16 bits); zero for
// r >= nrows or k0 + k >= d. kAsync: cp.async of 16-byte chunks (needs d % 8 == 0 and a 16-byte
// aligned src, so a chunk lies entirely inside or past the row); otherwise plain loads/stores.
template <int kRows, int kBK, int kLd, int kThreads, bool kAsync>
__device__ __forceinline__ void load_slice(uint16_t* dst, const uint16_t* __restrict__ src,
                                           int row0, int nrows, int d, int k0) {
  constexpr int kChunksPerRow = kBK / 8;
  static_assert(kBK % 8 == 0 && kRows * kChunksPerRow % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kRows * kChunksPerRow / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = c / kChunksPerRow, k = k0 + (c % kChunksPerRow) * 8;
    uint16_t* s = dst + r * kLd + (c % kChunksPerRow) * 8;
    const bool row_ok = r < nrows;
    if (kAsync) {
      const bool ok = row_ok && k < d;
      // A zero-size copy still gets a valid address: the array's start.
      cp_async_16(s, ok ? src + static_cast<int64_t>(row0 + r) * d + k : src, ok ? 16 : 0);
    } else {
      // The slow path for unaligned rows: a rolled loop keeps it from competing with the
      // accumulators for registers.
      const uint16_t* g = src + static_cast<int64_t>(row0 + (row_ok ? r : 0)) * d;
      uint32_t* s32 = reinterpret_cast<uint32_t*>(s);
#pragma unroll 1
      for (int e = 0; e < 4; ++e) {
        const uint32_t lo = row_ok && k + 2 * e < d ? g[k + 2 * e] : 0u;
        const uint32_t hi = row_ok && k + 2 * e + 1 < d ? g[k + 2 * e + 1] : 0u;
        s32[e] = lo | (hi << 16);
      }
    }
  }
}

}  // namespace mma
}  // namespace bct_fast
