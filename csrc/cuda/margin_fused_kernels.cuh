// Device code of the fused tensor-core forward (launchers: margin_fused.cu; contract:
// margin_fused.h). In a header so the CPU emulator compiles the same code (tile_common.cuh).
//
// Block = 128 rows of x (a row tile) x one range of classes (a split), 8 warps as 4 (rows) x 2
// (classes); each warp owns 32 rows x 64 classes of every 128 x 128 score tile, i.e. 2 x 8 mma
// tiles of m16n8 with fp32 accumulators in registers. The depth is streamed through a 4-stage
// cp.async pipeline of 32-wide slices of x and w (iterations flattened over class tile x depth
// slice, so the next class tile's first slices load while the current one finishes). After the
// last slice of a class tile the epilogue turns the accumulators into logits (scale, inverse
// norms, target column) and folds them into per-row running (max, sum-exp) kept in registers;
// the score tile never leaves the registers. At the end the two class halves of each row are
// combined through shared memory and the block writes its partial (m, l) per row; a second
// kernel merges the splits into lse. Every reduction has a fixed order (deterministic).
#pragma once
#include "mma_common.cuh"
#include "tile_common.cuh"

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

namespace fused {

constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;  // 256
constexpr int kMI = 2;                            // m16 tiles per warp (32 rows)
constexpr int kNI = 8;                            // n8 tiles per warp (64 classes)
constexpr int kBM = kWarpsM * kMI * 16;           // 128 rows per block
constexpr int kBN = kWarpsN * kNI * 8;            // 128 classes per class tile
constexpr int kBK = 32;                           // depth slice per pipeline stage
constexpr int kStages = 4;
// Row pitch of the smem tiles in bf16 elements: 80 bytes, so the 8 rows of one ldmatrix matrix
// fall in 8 distinct 16-byte bank groups (a 64-byte pitch would be a 4-way conflict).
constexpr int kLd = kBK + 8;
constexpr int kStageElems = (kBM + kBN) * kLd;
constexpr int kSmemBytes = kStages * kStageElems * 2;  // 81920: needs the > 48 KiB opt-in
constexpr int kMergeThreads = 256;

static_assert(2 * kWarpsN * kBM * 4 <= kSmemBytes, "the final combine reuses the stages");

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace fused

// Partial statistics of rows [blockIdx.x * kBM, +kBM) over the class tiles
// [blockIdx.y * tiles_per_split, +tiles_per_split): ws_m / ws_l[blockIdx.y * B + row].
// Same logits as margin_epilogue_kernels.cuh (epi::logit), same -inf conventions.
template <bool kAsync>
__global__ void __launch_bounds__(fused::kThreads, 2)
    fused_lse_partial_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ w,
                             int B, int C, int d, const float* __restrict__ inv_nx,
                             const float* __restrict__ inv_nw, const int64_t* __restrict__ labels,
                             float scale,
                             int tiles_per_split, float* __restrict__ ws_m,
                             float* __restrict__ ws_l) {
  using namespace fused;
  BCT_DYNAMIC_SMEM(uint16_t, smem);
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  // Indices fit in int: the launcher keeps B + kBM and C + kBN below 2^31.
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int c_begin = static_cast<int>(blockIdx.y) * tiles_per_split * kBN;
  const int c_end = C - c_begin < tiles_per_split * kBN ? C : c_begin + tiles_per_split * kBN;
  const int n_tiles = static_cast<int>((c_end - c_begin + kBN - 1) / kBN);
  const int nk = (d + kBK - 1) / kBK;
  const int total = n_tiles * nk;
  // Warps whose 32 rows all lie past B skip the math (they still load and synchronize).
  const bool rows_live = m0 + wm * (kMI * 16) < B;

  float row_m[kMI * 2], row_l[kMI * 2];  // running max / this lane's sum-exp, rows g, g+8 per mi
#pragma unroll
  for (int r = 0; r < kMI * 2; ++r) row_m[r] = -CUDART_INF_F, row_l[r] = 0.f;
  float acc[kMI][kNI][4];

  auto load_stage = [&](int it) {
    const int tile = it / nk, k0 = (it % nk) * kBK;
    uint16_t* xs = smem + (it % kStages) * kStageElems;
    const int n0 = c_begin + tile * kBN;
    mma::load_slice<kBM, kBK, kLd, kThreads, kAsync>(xs, x, m0, B - m0, d, k0);
    mma::load_slice<kBN, kBK, kLd, kThreads, kAsync>(xs + kBM * kLd, w, n0, c_end - n0, d, k0);
  };

#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load_stage(s);
    mma::cp_async_commit();  // empty groups keep the group count uniform
  }

  int kc = 0, tile = 0;  // depth slice and class tile of iteration `it`
#pragma unroll 1
  for (int it = 0; it < total; ++it) {
    mma::cp_async_wait<kStages - 2>();  // this thread's copies of slice `it` have landed
    __syncthreads();  // everyone's have; and slice it - 1's stage is no longer read
    if (it + kStages - 1 < total) load_stage(it + kStages - 1);  // into slice it - 1's stage
    mma::cp_async_commit();

    const int n0 = c_begin + tile * kBN;
    const bool live = rows_live && n0 + wn * (kNI * 8) < c_end;  // warp-uniform
    if (kc == 0) {
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
    }
    if (live) {
      const uint16_t* xs = smem + (it % kStages) * kStageElems + (wm * kMI * 16) * kLd;
      const uint16_t* ws = smem + (it % kStages) * kStageElems + (kBM + wn * kNI * 8) * kLd;
      mma::warp_tile_mma<kMI, kNI, kBK, kLd>(acc, xs, ws, lane);
    }

    if (kc == nk - 1 && live) {  // the class tile is complete: logits -> running statistics
      // Rows g, g+8 of each m16 tile: r = 2 mi + h. Rows past B compute harmless values that
      // are never written.
      float inx[kMI * 2], target[kMI * 2], mx[kMI * 2];
      int tcol[kMI * 2];  // target column relative to the tile; -1: none, or not in this tile
#pragma unroll
      for (int r = 0; r < kMI * 2; ++r) {
        const int row = m0 + wm * (kMI * 16) + (r / 2) * 16 + mma::acc_row(lane, 2 * (r % 2));
        const bool row_ok = row < B;
        inx[r] = row_ok ? inv_nx[row] : 0.f;
        // The target column is left out of the statistics (-inf): the caller combines them
        // with the target logit in float64.
        target[r] = -CUDART_INF_F;
        const int64_t label = row_ok ? labels[row] : -1;
        tcol[r] = label >= n0 && label < n0 + kBN ? static_cast<int>(label - n0) : -1;
        mx[r] = -CUDART_INF_F;
      }
      // Logits in place of the accumulators, column by column (one inv_nw live at a time).
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = wn * (kNI * 8) + ni * 8 + mma::acc_col(lane, e);
          const bool col_ok = n0 + col < c_end;  // past the split's last class: -inf
          const float inw = col_ok ? inv_nw[n0 + col] : 0.f;
#pragma unroll
          for (int r = 0; r < kMI * 2; ++r) {
            float& a = acc[r / 2][ni][2 * (r % 2) + e];
            // epi::logit's order: scale * s * inv_nx * inv_nw, left to right, fp32.
            const float v = col == tcol[r] ? target[r] : scale * a * inx[r] * inw;
            a = col_ok ? v : -CUDART_INF_F;
            mx[r] = fmaxf(mx[r], a);
          }
        }
#pragma unroll
      for (int r = 0; r < kMI * 2; ++r) {
        const float m_new = fmaxf(row_m[r], quad_max(mx[r]));
        // All -inf so far: use 0 as the reference so exp gives 0, never exp(-inf + inf).
        const float ref = m_new == -CUDART_INF_F ? 0.f : m_new;
        float sum = 0.f;
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) sum += expf(acc[r / 2][ni][2 * (r % 2) + e] - ref);
        row_l[r] = row_l[r] * expf(row_m[r] - ref) + sum;
        row_m[r] = m_new;
      }
    }
    if (++kc == nk) kc = 0, ++tile;
  }

  // Combine the kWarpsN class ranges of each row in a fixed order; the stages are free now.
  mma::cp_async_wait<0>();
  __syncthreads();
  float* red_m = reinterpret_cast<float*>(smem);  // [kWarpsN][kBM]
  float* red_l = red_m + kWarpsN * kBM;
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = quad_sum(row_l[2 * mi + h]);
      if (lane % 4 == 0) {
        const int row = wm * (kMI * 16) + mi * 16 + mma::acc_row(lane, 2 * h);
        red_m[wn * kBM + row] = row_m[2 * mi + h];
        red_l[wn * kBM + row] = l;
      }
    }
  __syncthreads();
  const int tr = static_cast<int>(threadIdx.x);
  if (tr < kBM && m0 + tr < B) {
    float m = red_m[tr], l = red_l[tr];
#pragma unroll
    for (int h = 1; h < kWarpsN; ++h) {
      const float mh = red_m[h * kBM + tr], lh = red_l[h * kBM + tr];
      const float mn = fmaxf(m, mh);
      if (mn != -CUDART_INF_F) l = l * expf(m - mn) + lh * expf(mh - mn);
      m = mn;
    }
    const int64_t out = static_cast<int64_t>(blockIdx.y) * B + m0 + tr;
    ws_m[out] = m;
    ws_l[out] = l;
  }
}

// lse[i] = M + log(sum_s l_s exp(m_s - M)), M = max_s m_s, over the splits in index order;
// -inf when every logit of the row is -inf. The sum in fp32, M + log L in double: an fp32 lse
// (~ulp(scale) ~ 4e-6 absolute) would swamp the loss of a well-classified row.
__global__ void __launch_bounds__(fused::kMergeThreads)
    fused_lse_merge_kernel(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                           int64_t B, int splits, double* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * fused::kMergeThreads + threadIdx.x;
  if (i >= B) return;
  float m = -CUDART_INF_F;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, ws_m[s * B + i]);
  if (m == -CUDART_INF_F) {
    lse[i] = -CUDART_INF_F;
    return;
  }
  float l = 0.f;
  for (int s = 0; s < splits; ++s) l += ws_l[s * B + i] * expf(ws_m[s * B + i] - m);
  lse[i] = static_cast<double>(m) + log(static_cast<double>(l));
}

// One warp: d = c + a @ b^T for a 16 x 16 (row-major), b 16 x 16 (row n holds depth k, like w)
// and c, d 16 x 16 fp32, through the same cp.async -> ldmatrix -> mma path and fragment
// addressing as fused_lse_partial_kernel (two n8 tiles). Checks the fragment plumbing.
__global__ void __launch_bounds__(32)
    mma_tile_check_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                          const float* __restrict__ c, float* __restrict__ d) {
  using namespace fused;
  __shared__ __align__(16) uint16_t as[16 * kLd];
  __shared__ __align__(16) uint16_t bs[16 * kLd];
  const int lane = static_cast<int>(threadIdx.x);
  {
    const int r = lane / 2, k = (lane % 2) * 8;  // 32 lanes x 16 bytes = one 16 x 16 matrix
    mma::cp_async_16(as + r * kLd + k, a + r * 16 + k, 16);
    mma::cp_async_16(bs + r * kLd + k, b + r * 16 + k, 16);
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  __syncthreads();
  float acc[1][2][4];
#pragma unroll
  for (int ni = 0; ni < 2; ++ni)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      acc[0][ni][i] = c[mma::acc_row(lane, i) * 16 + ni * 8 + mma::acc_col(lane, i)];
  mma::warp_tile_mma<1, 2, 16, kLd>(acc, as, bs, lane);  // the fused kernel's own fragment code
#pragma unroll
  for (int ni = 0; ni < 2; ++ni)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      d[mma::acc_row(lane, i) * 16 + ni * 8 + mma::acc_col(lane, i)] = acc[0][ni][i];
}

}  // namespace
}  // namespace bct_fast
