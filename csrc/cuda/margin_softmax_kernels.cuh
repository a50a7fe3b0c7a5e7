// Device code of the normalized-softmax sweeps (launchers: margin_softmax.cu). Kept in a header
// so the CPU emulator compiles the same code (see tile_common.cuh).
#pragma once
#include "tile_common.cuh"

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

using namespace tile;

// Block = (tile_rows rows of x) x (one class split). Streams the split's classes in tiles of
// kCols with an online max / sum-exp per row; with kWithAcc it also keeps, in dynamic shared
// memory, acc[r][:] = sum_{j != label_r} exp(z_rj - m_r) * w_hat_j, rescaled whenever the row
// max moves (flash-attention style), so the frozen-classifier gradient needs no second pass.
// Each row's target column is left out (its logit is -inf here): the statistics are those of
// the other columns, and the caller combines them with the target logit in float64.
template <typename T, bool kWithAcc>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ inv_nx,
                 const float* __restrict__ inv_nw, const int64_t* __restrict__ labels,
                 int64_t B, int64_t C, int64_t d,
                 float scale, int tile_rows, int64_t classes_per_split, float* __restrict__ m_out,
                 float* __restrict__ l_out, float* __restrict__ acc_out) {
  __shared__ float xs[kRows][kK + 1];
  __shared__ float ws[kCols][kK + 1];
  __shared__ float p[kRows][kCols + 1];
  __shared__ float row_m[kRows], row_l[kRows], row_alpha[kRows];
  BCT_DYNAMIC_SMEM(float, acc);  // [tile_rows][d], only with kWithAcc

  const int lane = threadIdx.x % 32, rg = threadIdx.x / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * tile_rows;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * classes_per_split;
  const int64_t c_end = min(C, c_begin + classes_per_split);

  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    row_m[r] = -CUDART_INF_F;
    row_l[r] = 0.f;
    row_alpha[r] = 1.f;
  }
  if (kWithAcc)
    for (int64_t e = threadIdx.x; e < tile_rows * d; e += kThreads) acc[e] = 0.f;
  __syncthreads();

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kCols) {
    float dot[kRows / 8];
    dot_tile(x, row0, B, tile_rows, w, c0, C, d, xs, ws, dot);

    const int64_t col = c0 + lane;
    const bool col_ok = col < c_end;
    const float inw = col_ok ? inv_nw[col] : 0.f;
#pragma unroll
    for (int i = 0; i < kRows / 8; ++i) {
      const int r = rg + 8 * i;
      if (r >= tile_rows) continue;
      const int64_t row = row0 + r;
      float z = -CUDART_INF_F;
      if (col_ok && row < B)
        z = (labels[row] == col) ? -CUDART_INF_F : scale * dot[i] * inv_nx[row] * inw;
      p[r][lane] = z;
    }
    __syncthreads();

    // One warp per row: tile max, new running max, rescale factor, tile sum of exp.
    for (int r = rg; r < tile_rows; r += 8) {
      if (row0 + r >= B) {  // padding rows: keep them inert
        p[r][lane] = 0.f;
        continue;
      }
      const float z = p[r][lane];
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, warp_max(z));
      // Every logit so far -inf (masked columns, or -inf inputs): -inf - -inf would be NaN.
      const bool none_yet = m_new == -CUDART_INF_F;
      const float e = none_yet ? 0.f : expf(z - m_new);  // 0 for masked columns
      const float tsum = warp_sum(e);
      p[r][lane] = kWithAcc ? e * inw : e;
      __syncwarp();
      if (lane == 0) {
        // 0 while nothing was accumulated (m_old = -inf), never exp(-inf - -inf) = NaN.
        const float alpha = m_old == -CUDART_INF_F ? 0.f : expf(m_old - m_new);
        row_alpha[r] = alpha;
        row_l[r] = row_l[r] * alpha + tsum;
        row_m[r] = m_new;
      }
    }
    __syncthreads();

    if (kWithAcc) {
      for (int64_t k0 = 0; k0 < d; k0 += kK) {
        load(w, c0, C, d, k0, ws, kCols);
        __syncthreads();
        const int64_t gk = k0 + lane;
        if (gk < d) {
          for (int r = rg; r < tile_rows; r += 8) {
            float s = 0.f;
#pragma unroll 8
            for (int j = 0; j < kCols; ++j) s = fmaf(p[r][j], ws[j][lane], s);
            float& a = acc[r * d + gk];
            a = a * row_alpha[r] + s;
          }
        }
        __syncthreads();
      }
    }
  }

  const int64_t out0 = static_cast<int64_t>(blockIdx.y) * B;
  for (int r = threadIdx.x; r < tile_rows; r += kThreads) {
    if (row0 + r < B) {
      m_out[out0 + row0 + r] = row_m[r];
      l_out[out0 + row0 + r] = row_l[r];
    }
  }
  if (kWithAcc) {
    for (int64_t e = threadIdx.x; e < tile_rows * d; e += kThreads) {
      const int64_t r = e / d;
      if (row0 + r < B) acc_out[(out0 + row0) * d + e] = acc[e];
    }
  }
}

// Block = tile_cols classes (owned: written once, no atomics) x all rows, in row tiles of kRows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const T* __restrict__ x, const T* __restrict__ w,
                       const float* __restrict__ inv_nx, const float* __restrict__ inv_nw,
                       const int64_t* __restrict__ labels, const float* __restrict__ lse,
                       const float* __restrict__ row_coef, int64_t B,
                       int64_t C, int64_t d, float scale, int tile_cols, float* __restrict__ out) {
  __shared__ float xs[kRows][kK + 1];
  __shared__ float ws[kCols][kK + 1];
  __shared__ float p[kRows][kCols + 1];  // p[r][j]: coefficient of x_hat_r for class j
  BCT_DYNAMIC_SMEM(float, acc);  // [tile_cols][d]

  const int lane = threadIdx.x % 32, rg = threadIdx.x / 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * tile_cols;
  for (int64_t e = threadIdx.x; e < tile_cols * d; e += kThreads) acc[e] = 0.f;
  __syncthreads();

  const int64_t col = c0 + lane;
  const bool col_ok = lane < tile_cols && col < C;
  const float inw = col_ok ? inv_nw[col] : 0.f;
  for (int64_t row0 = 0; row0 < B; row0 += kRows) {
    float dot[kRows / 8];
    dot_tile(x, row0, B, kRows, w, c0, C, d, xs, ws, dot);
#pragma unroll
    for (int i = 0; i < kRows / 8; ++i) {
      const int r = rg + 8 * i;
      const int64_t row = row0 + r;
      float v = 0.f;
      if (col_ok && row < B) {
        const float rc = row_coef[row];
        // The target column is left out (0): the caller adds its coefficient in float64.
        if (rc != 0.f && labels[row] != col)
          v = rc * expf(scale * dot[i] * inv_nx[row] * inw - lse[row]) * inv_nx[row];
      }
      p[r][lane] = v;
    }
    __syncthreads();
    for (int64_t k0 = 0; k0 < d; k0 += kK) {
      load(x, row0, B, d, k0, xs, kRows);
      __syncthreads();
      const int64_t gk = k0 + lane;
      if (gk < d) {
        for (int j = rg; j < tile_cols; j += 8) {
          float s = 0.f;
#pragma unroll 8
          for (int r = 0; r < kRows; ++r) s = fmaf(p[r][j], xs[r][lane], s);
          acc[j * d + gk] += s;
        }
      }
      __syncthreads();
    }
  }
  for (int64_t e = threadIdx.x; e < tile_cols * d; e += kThreads) {
    const int64_t j = e / d;
    if (c0 + j < C) out[c0 * d + e] = acc[e];
  }
}

}  // namespace
}  // namespace bct_fast
