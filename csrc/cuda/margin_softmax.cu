// Normalized-softmax cross-entropy sweeps: online log-sum-exp (+ softmax-weighted sum of the
// normalized class rows) and the weight-side gradient. See margin_softmax.h for the contract.
#include <math_constants.h>

#include "bct_fast/margin_softmax.h"
#include "tile_common.cuh"

namespace bct_fast {
namespace {

using namespace tile;

// Block = (tile_rows rows of x) x (one class split). Streams the split's classes in tiles of
// kCols with an online max / sum-exp per row; with kWithAcc it also keeps, in dynamic shared
// memory, acc[r][:] = sum_j exp(z_rj - m_r) * w_hat_j, rescaled whenever the row max moves
// (flash-attention style), so the frozen-classifier gradient needs no second pass.
template <typename T, bool kWithAcc>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ inv_nx,
                 const float* __restrict__ inv_nw, const int64_t* __restrict__ labels,
                 const float* __restrict__ target_logit, int64_t B, int64_t C, int64_t d,
                 float scale, int tile_rows, int64_t classes_per_split, float* __restrict__ m_out,
                 float* __restrict__ l_out, float* __restrict__ acc_out) {
  __shared__ float xs[kRows][kK + 1];
  __shared__ float ws[kCols][kK + 1];
  __shared__ float p[kRows][kCols + 1];
  __shared__ float row_m[kRows], row_l[kRows], row_alpha[kRows];
  extern __shared__ float acc[];  // [tile_rows][d], only with kWithAcc

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
        z = (labels[row] == col) ? target_logit[row] : scale * dot[i] * inv_nx[row] * inw;
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
      const float m_new = fmaxf(m_old, warp_max(z));  // finite: the tile has >= 1 valid class
      const float e = expf(z - m_new);                // 0 for masked columns
      const float tsum = warp_sum(e);
      p[r][lane] = kWithAcc ? e * inw : e;
      __syncwarp();
      if (lane == 0) {
        const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
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
                       const int64_t* __restrict__ labels, const float* __restrict__ target_logit,
                       const float* __restrict__ lse, const float* __restrict__ row_coef, int64_t B,
                       int64_t C, int64_t d, float scale, int tile_cols, float* __restrict__ out) {
  __shared__ float xs[kRows][kK + 1];
  __shared__ float ws[kCols][kK + 1];
  __shared__ float p[kRows][kCols + 1];  // p[r][j]: coefficient of x_hat_r for class j
  extern __shared__ float acc[];         // [tile_cols][d]

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
        if (rc != 0.f) {
          const float z =
              (labels[row] == col) ? target_logit[row] : scale * dot[i] * inv_nx[row] * inw;
          v = rc * expf(z - lse[row]) * inv_nx[row];
        }
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

// Largest tile (32, 16, ..., 1 rows) whose fp32 [tile][d] accumulator fits in shared memory.
int pick_tile(int64_t d, int static_bytes) {
  const int64_t budget = max_dynamic_smem(static_bytes);
  for (int t = kRows; t >= 1; t /= 2)
    if (t * d * static_cast<int64_t>(sizeof(float)) <= budget) return t;
  return 0;
}

template <typename T>
Status launch_stats(const T* x, const T* w, const float* inv_nx, const float* inv_nw,
                    const int64_t* labels, const float* target_logit, int64_t B, int64_t C,
                    int64_t d, float scale, int splits, float* m, float* l, float* acc,
                    cudaStream_t stream) {
  const int64_t per_split = ((C + splits - 1) / splits + kCols - 1) / kCols * kCols;
  if (acc == nullptr) {
    dim3 grid(static_cast<unsigned>((B + kRows - 1) / kRows), splits);
    stats_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, w, inv_nx, inv_nw, labels,
                                                          target_logit, B, C, d, scale, kRows,
                                                          per_split, m, l, nullptr);
    return check_launch("margin_softmax_stats");
  }
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, stats_kernel<T, true>);
  const int rows = pick_tile(d, static_cast<int>(attr.sharedSizeBytes));
  if (rows == 0) return Status::Error("margin_softmax_stats: embedding dim too large for the kernel");
  const size_t smem = static_cast<size_t>(rows) * d * sizeof(float);
  cudaFuncSetAttribute(stats_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  dim3 grid(static_cast<unsigned>((B + rows - 1) / rows), splits);
  stats_kernel<T, true><<<grid, kThreads, smem, stream>>>(x, w, inv_nx, inv_nw, labels,
                                                          target_logit, B, C, d, scale, rows,
                                                          per_split, m, l, acc);
  return check_launch("margin_softmax_stats");
}

template <typename T>
Status launch_grad_weight(const T* x, const T* w, const float* inv_nx, const float* inv_nw,
                          const int64_t* labels, const float* target_logit, const float* lse,
                          const float* row_coef, int64_t B, int64_t C, int64_t d, float scale,
                          float* out, cudaStream_t stream) {
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, grad_weight_kernel<T>);
  const int cols = pick_tile(d, static_cast<int>(attr.sharedSizeBytes));
  if (cols == 0)
    return Status::Error("margin_softmax_grad_weight: embedding dim too large for the kernel");
  const size_t smem = static_cast<size_t>(cols) * d * sizeof(float);
  cudaFuncSetAttribute(grad_weight_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  const unsigned blocks = static_cast<unsigned>((C + cols - 1) / cols);
  grad_weight_kernel<T><<<blocks, kThreads, smem, stream>>>(
      x, w, inv_nx, inv_nw, labels, target_logit, lse, row_coef, B, C, d, scale, cols, out);
  return check_launch("margin_softmax_grad_weight");
}

}  // namespace

Status margin_softmax_stats(const void* x, const void* w, const float* inv_nx, const float* inv_nw,
                            const int64_t* labels, const float* target_logit, int64_t B, int64_t C,
                            int64_t d, DType dtype, float scale, int splits, float* m, float* l,
                            float* acc, void* stream) {
  if (B <= 0 || C <= 0 || d <= 0 || splits <= 0)
    return Status::Error("margin_softmax_stats: sizes must be positive");
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_stats(static_cast<const float*>(x), static_cast<const float*>(w), inv_nx,
                          inv_nw, labels, target_logit, B, C, d, scale, splits, m, l, acc, s);
    case DType::kFloat16:
      return launch_stats(static_cast<const __half*>(x), static_cast<const __half*>(w), inv_nx,
                          inv_nw, labels, target_logit, B, C, d, scale, splits, m, l, acc, s);
    case DType::kBFloat16:
      return launch_stats(static_cast<const __nv_bfloat16*>(x),
                          static_cast<const __nv_bfloat16*>(w), inv_nx, inv_nw, labels,
                          target_logit, B, C, d, scale, splits, m, l, acc, s);
  }
  return Status::Error("margin_softmax_stats: unknown dtype code");
}

Status margin_softmax_grad_weight(const void* x, const void* w, const float* inv_nx,
                                  const float* inv_nw, const int64_t* labels,
                                  const float* target_logit, const float* lse,
                                  const float* row_coef, int64_t B, int64_t C, int64_t d,
                                  DType dtype, float scale, float* out, void* stream) {
  if (B <= 0 || C <= 0 || d <= 0)
    return Status::Error("margin_softmax_grad_weight: sizes must be positive");
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad_weight(static_cast<const float*>(x), static_cast<const float*>(w),
                                inv_nx, inv_nw, labels, target_logit, lse, row_coef, B, C, d,
                                scale, out, s);
    case DType::kFloat16:
      return launch_grad_weight(static_cast<const __half*>(x), static_cast<const __half*>(w),
                                inv_nx, inv_nw, labels, target_logit, lse, row_coef, B, C, d,
                                scale, out, s);
    case DType::kBFloat16:
      return launch_grad_weight(static_cast<const __nv_bfloat16*>(x),
                                static_cast<const __nv_bfloat16*>(w), inv_nx, inv_nw, labels,
                                target_logit, lse, row_coef, B, C, d, scale, out, s);
  }
  return Status::Error("margin_softmax_grad_weight: unknown dtype code");
}

}  // namespace bct_fast
