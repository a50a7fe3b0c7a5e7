// Device code of the fused frozen-classifier forward: lse AND pws = sum_j softmax_ij * w_hat_j
// (launchers: margin_fused.cu; contract: margin_fused.h; design: docs/design_fused_frozen_forward.md
// section 4, "v1"). In a header so the CPU emulator compiles the same code.
//
// Block = 64 rows of x x one class range (a split) of whole 64-class tiles; 8 warps as
// wr (0..1, 32 rows each) x wp (0..3). x (64 x kDP, kDP = d padded to 64/128/256/512) stays
// resident in smem; w tiles (64 classes x kDP, full depth) stream through 2 cp.async stages.
// Per class tile j:
//   B1  wait for tile j; everyone is done with PV(j-1) -> prefetch tile j+1 into the other stage
//   S   warp (wr, wp): S[32 rows x classes wp*16..+16] over the full depth (mma.sync, ldmatrix)
//       -> logits (scale * s * inv_nx * inv_nw; the target column and past c_end -inf)
//   B2  row max of the tile exchanged through red_max[wp][row] (all 4 wp warps get the same m)
//       p = exp(z - m); l += p; P' = p * inv_nw in bf16 (0 in the target column); the warp
//       keeps its own 16 columns as an A fragment (C -> A reuse) and stores them to P[64][72]
//   B3  P complete; O *= alpha; O[32 rows x depth panel wp*kDP/4..] += P @ w_tile (B operand
//       = the same smem w tile through ldmatrix.trans; A = P, own k16 block from registers)
// O (fp32) stays in registers: 2 x kDP/32 m16n8 tiles per warp (128 floats at kDP = 512).
// The scores never leave the registers / the P buffer. Each block writes (m, l, O) per row to
// the workspace; fused_pws_merge_kernel merges the splits in index order. The target column is
// left out of everything (the caller combines the statistics with the target logit in float64).
// Every reduction has a fixed order: deterministic.
#pragma once
#include "margin_fused_kernels.cuh"  // fused::quad_max / quad_sum
#include "mma_common.cuh"
#include "tile_common.cuh"

// BCT_FAST_EMU_BREAK_PWS_B2 / BCT_FAST_EMU_BREAK_PWS_B3 (emulator self-test only) drop barrier
// B2 / B3 of fused_pws_partial_kernel: the race check must catch it.

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

namespace fpws {

constexpr int kWarpsR = 2, kWarpsP = 4;
constexpr int kThreads = 32 * kWarpsR * kWarpsP;  // 256
constexpr int kBM = 64;                           // rows per block (32 per wr warp row)
constexpr int kBN = 64;                           // classes per tile (16 per wp warp)
constexpr int kPLd = kBN + 8;  // P pitch: 144 B, bf16x2 stores from C fragments hit 32 banks
constexpr int kMaxD = 512;
constexpr int kMergeThreads = 128;

template <int kDP>
struct Shape {
  static_assert(kDP % 64 == 0 && kDP <= kMaxD, "panels of whole n8 pairs");
  // Row pitch of x and w in bf16 elements: 2 kDP + 16 bytes = 16 mod 128, so the 8 rows of an
  // ldmatrix (plain or .trans) matrix fall in 8 distinct 16-byte bank groups.
  static constexpr int kLd = kDP + 8;
  static constexpr int kPW = kDP / kWarpsP;  // depth panel of one warp's O
  static constexpr int kNO = kPW / 8;        // n8 tiles of O per m16 tile
  static constexpr int kXElems = kBM * kLd;
  static constexpr int kWElems = kBN * kLd;
  static constexpr int kOffP = (kXElems + 2 * kWElems) * 2;  // bytes
  static constexpr int kOffRow = kOffP + kBM * kPLd * 2;     // inv_nx, target, local label
  static constexpr int kOffRed = kOffRow + 3 * kBM * 4;      // red_max[4][64], red_l[4][64]
  static constexpr int kSmemBytes = kOffRed + 2 * kWarpsP * kBM * 4;
};
static_assert(Shape<512>::kSmemBytes <= 227 * 1024, "fits an sm_90 block");

// rows x kDP of x or w into smem (pitch kLd), zero past nrows / d: a rolled loop of 64-deep
// slices, so the addresses are not kept live across the main loop (register pressure).
template <int kRows, int kDP, int kLd, bool kAsync>
__device__ __forceinline__ void load_rows(uint16_t* dst, const uint16_t* __restrict__ src,
                                          int row0, int nrows, int d) {
#pragma unroll 1
  for (int k0 = 0; k0 < kDP; k0 += 64)
    mma::load_slice<kRows, 64, kLd, kThreads, kAsync>(dst + k0, src, row0, nrows, d, k0);
}

}  // namespace fpws

// Partial (m, l, O) of rows [blockIdx.x * 64, +64) over the class tiles
// [blockIdx.y * tiles_per_split, +tiles_per_split) of 64: ws_m / ws_l[blockIdx.y * B + row],
// ws_o[(blockIdx.y * B + row) * d + k]. Needs d <= kDP; kAsync: cp.async (d % 8 == 0, aligned).
template <int kDP, bool kAsync>
__global__ void __launch_bounds__(fpws::kThreads, 1)
    fused_pws_partial_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w,
                             int B, int C, int d, const float* __restrict__ inv_nx,
                             const float* __restrict__ inv_nw, const int64_t* __restrict__ labels,
                             float scale,
                             int tiles_per_split, float* __restrict__ ws_m,
                             float* __restrict__ ws_l, float* __restrict__ ws_o) {
  using namespace fpws;
  using S = Shape<kDP>;
  constexpr int kLd = S::kLd, kPW = S::kPW, kNO = S::kNO;
  BCT_DYNAMIC_SMEM(uint16_t, smem);
  uint16_t* const xs = smem;
  uint16_t* const wst = smem + S::kXElems;  // 2 stages
  uint16_t* const ps = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(smem) + S::kOffP);
  float* const row_inx = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + S::kOffRow);
  float* const row_tgt = row_inx + kBM;
  int* const row_lab = reinterpret_cast<int*>(row_tgt + kBM);  // label - c_begin, or -1
  float* const red_max = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + S::kOffRed);
  float* const red_l = red_max + kWarpsP * kBM;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int wp = warp % kWarpsP, wr = warp / kWarpsP;
  const int r0 = wr * 32;  // the warp's first row in the block
  // Indices fit in int: the launcher keeps B + 64 and C + 64 below 2^31.
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int c_begin = static_cast<int>(blockIdx.y) * tiles_per_split * kBN;
  const int c_end = C - c_begin < tiles_per_split * kBN ? C : c_begin + tiles_per_split * kBN;
  const int n_tiles = (c_end - c_begin + kBN - 1) / kBN;
  // Warps whose 32 rows all lie past B skip the products (they still synchronize).
  const bool live = m0 + r0 < B;

  if (tid < kBM) {  // per-row constants; visible after B1 of the first tile
    const int row = m0 + tid;
    const bool ok = row < B;
    const int64_t label = ok ? labels[row] : -1;
    row_inx[tid] = ok ? inv_nx[row] : 0.f;
    row_tgt[tid] = -CUDART_INF_F;  // the target column is left out
    row_lab[tid] = label >= c_begin && label < c_end ? static_cast<int>(label - c_begin) : -1;
  }
  load_rows<kBM, kDP, kLd, kAsync>(xs, x, m0, B - m0, d);
  load_rows<kBN, kDP, kLd, kAsync>(wst, w, c_begin, c_end - c_begin, d);
  mma::cp_async_commit();

  float o[2][kNO][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNO; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[mi][ni][i] = 0.f;
  // Rows of this lane: r = 2 mi + h -> block row r0 + 16 mi + g + 8 h.
  float row_m[4], row_l[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) row_m[r] = -CUDART_INF_F, row_l[r] = 0.f;
  int lrow[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) lrow[r] = r0 + (r / 2) * 16 + mma::acc_row(lane, 2 * (r % 2));

#pragma unroll 1
  for (int j = 0; j < n_tiles; ++j) {
    mma::cp_async_wait<0>();  // this thread's copies of tile j (and x) have landed
    __syncthreads();          // B1: everyone's have; PV(j-1) is done with the other stage and P
    const int n0 = c_begin + j * kBN;
    if (j + 1 < n_tiles)
      load_rows<kBN, kDP, kLd, kAsync>(wst + ((j + 1) % 2) * S::kWElems, w, n0 + kBN,
                                       c_end - n0 - kBN, d);
    mma::cp_async_commit();
    const uint16_t* const wcur = wst + (j % 2) * S::kWElems;

    // ---- S: 32 rows x 16 classes over the full depth ----
    float s[2][2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mi][ni][i] = 0.f;
    if (live) {
#pragma unroll 1
      for (int k0 = 0; k0 < kDP; k0 += 64)
        mma::warp_tile_mma<2, 2, 64, kLd>(s, xs + r0 * kLd + k0, wcur + (wp * 16) * kLd + k0, lane);
    }

    // ---- logits in place, the tile's row max ----
    float inx[4], tgt[4], mx[4];
    int tcol[4];  // target column relative to the tile (may be out of range: no target here)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      inx[r] = row_inx[lrow[r]];
      tgt[r] = row_tgt[lrow[r]];
      const int lab = row_lab[lrow[r]];
      tcol[r] = lab < 0 ? -1 : lab - j * kBN;
      mx[r] = -CUDART_INF_F;
    }
    float inw[2][2];
#pragma unroll
    for (int ni = 0; ni < 2; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = wp * 16 + ni * 8 + mma::acc_col(lane, e);
        const bool col_ok = n0 + col < c_end;  // past the split's last class: -inf
        inw[ni][e] = col_ok ? inv_nw[n0 + col] : 0.f;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float& a = s[r / 2][ni][2 * (r % 2) + e];
          // epi::logit's order: scale * s * inv_nx * inv_nw, left to right, fp32.
          const float v = col == tcol[r] ? tgt[r] : scale * a * inx[r] * inw[ni][e];
          a = col_ok ? v : -CUDART_INF_F;
          mx[r] = fmaxf(mx[r], a);
        }
      }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float q = fused::quad_max(mx[r]);
      if (lane % 4 == 0) red_max[wp * kBM + lrow[r]] = q;
    }
#ifndef BCT_FAST_EMU_BREAK_PWS_B2
    __syncthreads();  // B2: the 4 column warps' maxima of every row
#endif

    // ---- online softmax; P' = p * inv_nw (0 in the target column) in bf16 ----
    float alpha[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float m_new = row_m[r];
#pragma unroll
      for (int q = 0; q < kWarpsP; ++q) m_new = fmaxf(m_new, red_max[q * kBM + lrow[r]]);
      // All -inf so far: use 0 as the reference so exp gives 0, never exp(-inf + inf).
      const float ref = m_new == -CUDART_INF_F ? 0.f : m_new;
      alpha[r] = expf(row_m[r] - ref);
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& a = s[r / 2][ni][2 * (r % 2) + e];
          const float p = expf(a - ref);
          sum += p;
          const int col = wp * 16 + ni * 8 + mma::acc_col(lane, e);
          a = col == tcol[r] ? 0.f : p * inw[ni][e];
        }
      row_l[r] = row_l[r] * alpha[r] + sum;
      row_m[r] = m_new;
    }
    uint32_t own[2][4];  // this warp's 16 columns of P as the A fragment of its k16 block
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      mma::c_to_a(own[mi], s[mi][0], s[mi][1]);
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = r0 + mi * 16 + mma::acc_row(lane, 2 * h);
          const int col = wp * 16 + ni * 8 + mma::acc_col(lane, 0);
          *reinterpret_cast<uint32_t*>(ps + row * kPLd + col) = own[mi][2 * ni + h];
        }
    }
#ifndef BCT_FAST_EMU_BREAK_PWS_B3
    __syncthreads();  // B3: P complete
#endif

    // ---- PV: O[32 rows x panel] = alpha O + P @ w_tile[:, panel] ----
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNO; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[mi][ni][i] *= alpha[2 * mi + i / 2];
    if (live) {
#pragma unroll 1
      for (int ks = 0; ks < kWarpsP; ++ks) {  // k16 blocks of the tile's classes
        uint32_t a[2][4];
        if (ks == wp) {  // warp-uniform
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int i = 0; i < 4; ++i) a[mi][i] = own[mi][i];
        } else {
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
            mma::ldmatrix_x4(a[mi], ps + (r0 + mi * 16 + mma::a_ld_row(lane)) * kPLd + ks * 16 +
                                        mma::a_ld_col(lane));
        }
        const uint16_t* const wk = wcur + (ks * 16 + mma::bt_ld_row(lane)) * kLd + wp * kPW +
                                   mma::bt_ld_col(lane);
#pragma unroll
        for (int pp = 0; pp < kNO / 2; ++pp) {
          uint32_t b[4];
          mma::ldmatrix_x4_trans(b, wk + pp * 16);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint32_t b2[2] = {b[2 * q], b[2 * q + 1]};
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) mma::mma_m16n8k16_bf16(o[mi][2 * pp + q], a[mi], b2);
          }
        }
      }
    }
  }

  // ---- the block's partials: m (same in all wp warps), l (4 column warps, fixed order), O ----
  mma::cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float l = fused::quad_sum(row_l[r]);
    if (lane % 4 == 0) red_l[wp * kBM + lrow[r]] = l;
  }
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.y) * B + m0;
  if (tid < kBM && m0 + tid < B) {
    float l = red_l[tid];
#pragma unroll
    for (int q = 1; q < kWarpsP; ++q) l += red_l[q * kBM + tid];
    ws_l[base + tid] = l;
  }
  if (wp == 0 && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (m0 + lrow[r] < B) ws_m[base + lrow[r]] = row_m[r];
  }
  if (live) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNO; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = r0 + mi * 16 + mma::acc_row(lane, i);
          const int col = wp * kPW + ni * 8 + mma::acc_col(lane, i);
          if (m0 + row < B && col < d) ws_o[(base + row) * d + col] = o[mi][ni][i];
        }
  }
}

// Block = one row. M = max_s m_s, L = sum_s l_s exp(m_s - M), O = sum_s exp(m_s - M) O_s over
// the splits in index order; lse = M + log L in double (-inf when every logit is -inf), pws =
// O / L, all over the non-target columns: the caller combines them with the target logit in
// float64 (p_y - 1 without cancellation).
__global__ void __launch_bounds__(fpws::kMergeThreads)
    fused_pws_merge_kernel(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                           const float* __restrict__ ws_o, int64_t B, int d, int splits,
                           double* __restrict__ lse, float* __restrict__ pws) {
  const int64_t i = blockIdx.x;
  float m = -CUDART_INF_F;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, ws_m[s * B + i]);
  const bool finite = m != -CUDART_INF_F;
  float l = 0.f;
  if (finite)
    for (int s = 0; s < splits; ++s) l += ws_l[s * B + i] * expf(ws_m[s * B + i] - m);
  if (threadIdx.x == 0)
    lse[i] = finite ? static_cast<double>(m) + log(static_cast<double>(l)) : -CUDART_INF_F;
  for (int k = static_cast<int>(threadIdx.x); k < d; k += fpws::kMergeThreads) {
    float acc = 0.f;
    if (finite)
      for (int s = 0; s < splits; ++s)
        acc += expf(ws_m[s * B + i] - m) * ws_o[(s * B + i) * d + k];
    pws[i * d + k] = acc / l;
  }
}

// One warp: d = c + p @ w for p 16 x 16 bf16 (row-major [m][k]), w 16 x 16 bf16 row-major
// [k][n] (n contiguous, like a w tile read as the PV product's B) and c, d 16 x 16 fp32, through
// the PV path of fused_pws_partial_kernel: p enters as fp32 C fragments packed into the A
// fragment (c_to_a), w goes cp.async -> ldmatrix.trans with the kernel's addressing.
__global__ void __launch_bounds__(32)
    pv_tile_check_kernel(const uint16_t* __restrict__ p, const uint16_t* __restrict__ w,
                         const float* __restrict__ c, float* __restrict__ d) {
  constexpr int kLd = 24;  // 48-byte rows: 16-byte aligned ldmatrix rows
  __shared__ __align__(16) uint16_t ws[16 * kLd];
  const int lane = static_cast<int>(threadIdx.x);
  {
    const int r = lane / 2, k = (lane % 2) * 8;
    mma::cp_async_16(ws + r * kLd + k, w + r * 16 + k, 16);
  }
  mma::cp_async_commit();
  float t[2][4], acc[2][4];
#pragma unroll
  for (int ni = 0; ni < 2; ++ni)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int off = mma::acc_row(lane, i) * 16 + ni * 8 + mma::acc_col(lane, i);
      t[ni][i] = mma::bf16_bits_to_float(p[off]);  // exact: packs back to the same bits
      acc[ni][i] = c[off];
    }
  uint32_t a[4];
  mma::c_to_a(a, t[0], t[1]);
  mma::cp_async_wait<0>();
  __syncthreads();
  uint32_t b[4];
  mma::ldmatrix_x4_trans(b, ws + mma::bt_ld_row(lane) * kLd + mma::bt_ld_col(lane));
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t b2[2] = {b[2 * q], b[2 * q + 1]};
    mma::mma_m16n8k16_bf16(acc[q], a, b2);
  }
#pragma unroll
  for (int ni = 0; ni < 2; ++ni)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      d[mma::acc_row(lane, i) * 16 + ni * 8 + mma::acc_col(lane, i)] = acc[ni][i];
}

}  // namespace
}  // namespace bct_fast
