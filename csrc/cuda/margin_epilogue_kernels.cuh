// Device code of the margin-softmax epilogue provider (launchers: margin_epilogue.cu; contract:
// margin_epilogue.h). In a header so the CPU emulator compiles the same code (tile_common.cuh).
//
// One block per row of the score block: the row (cols fp32 values, written by the GEMM just
// before and still in L2) is streamed with coalesced loads: once in the stats kernel without e
// (per-thread online max / sum-exp, the pairs combined at the end), twice with e (max, then the
// exp-sum and e, which needs the row's final max), once in the grads kernel. Reductions have a
// fixed order (per-thread strided sums, xor-shuffle warp sums, warps combined in index order):
// results do not depend on scheduling.
#pragma once
#include "tile_common.cuh"

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

namespace epi {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// The logit of column j of a row: -inf in the target column (left out of every sweep; the caller
// combines the statistics with the margin logit in float64), every other column
// scale * s * inv_nx * inv_nw in this order (the torch twin multiplies in the same order, so
// both produce the same fp32 z bit for bit).
__device__ __forceinline__ float logit(float s, float scale, float inx, float inw, int64_t j,
                                       int64_t target_col) {
  return j == target_col ? -CUDART_INF_F : scale * s * inx * inw;
}

// Block-wide max (kMax) or sum of one value per thread; `red` is kWarps floats of smem that no
// other reduction of the block uses. All threads get the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  v = kMax ? tile::warp_max(v) : tile::warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r = kMax ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

}  // namespace epi

// The target column stays out of everything here: the statistics are over the other columns and
// the coefficient blocks (e, p, pw) hold 0 there; the caller adds that column's coefficient
// p_y - 1 in float64. Rounded to bf16 in a block, p_y ~ 1 would carry an error of 2^-9, the whole
// gradient of a well-classified row.

// Block = one row. With kWriteE also writes e = exp(z - m_new) * inv_nw (TE) and alpha.
template <typename TE, bool kWriteE>
__global__ void __launch_bounds__(epi::kThreads)
    stats_epilogue_kernel(const float* __restrict__ scores, int64_t cols,
                          const float* __restrict__ inv_nx, const float* __restrict__ inv_nw,
                          const int64_t* __restrict__ labels,
                          int64_t c0, float scale,
                          float* __restrict__ m, float* __restrict__ l, TE* __restrict__ e_out,
                          float* __restrict__ alpha_out) {
  __shared__ float red_max[epi::kWarps], red_sum[epi::kWarps];
  const int64_t row = blockIdx.x;
  const float* s = scores + row * cols;
  const float inx = inv_nx[row];
  const int64_t target_col = labels[row] < 0 ? -1 : labels[row] - c0;  // may lie outside [0, cols)
  const float m_old = m[row];  // read before thread 0 rewrites it (after two barriers)

  if (!kWriteE) {  // one read of the row: this thread's online (max, sum-exp) over its columns
    float tm = -CUDART_INF_F, tl = 0.f;
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < cols; j += epi::kThreads) {
      const float z = epi::logit(s[j], scale, inx, inv_nw[j], j, target_col);
      if (z > tm) {  // a new max: rescale the sum (tm = -inf: tl is 0 and expf(-inf) = 0)
        tl = tl * expf(tm - z) + 1.f;
        tm = z;
      } else if (tm != -CUDART_INF_F) {  // z <= tm; both -inf would give NaN, and adds 0
        tl += expf(z - tm);
      }
    }
    const float m_new = fmaxf(m_old, epi::block_reduce<true>(tm, red_max));
    // This thread's pairs rescaled to the row's max; all -inf so far: nothing to add.
    const float part = tm == -CUDART_INF_F ? 0.f : tl * expf(tm - m_new);
    const float tsum = epi::block_reduce<false>(part, red_sum);
    if (threadIdx.x == 0) {
      const float alpha = m_old == -CUDART_INF_F ? 0.f : expf(m_old - m_new);
      l[row] = l[row] * alpha + tsum;
      m[row] = m_new;
    }
    return;
  }

  float tmax = -CUDART_INF_F;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < cols; j += epi::kThreads)
    tmax = fmaxf(tmax, epi::logit(s[j], scale, inx, inv_nw[j], j, target_col));
  const float m_new = fmaxf(m_old, epi::block_reduce<true>(tmax, red_max));
  // Every logit so far -inf: -inf - -inf would be NaN; those columns contribute 0.
  const bool none_yet = m_new == -CUDART_INF_F;

  float tsum = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < cols; j += epi::kThreads) {
    const float inw = inv_nw[j];
    const float z = epi::logit(s[j], scale, inx, inw, j, target_col);
    const float e = none_yet ? 0.f : expf(z - m_new);
    tsum += e;
    if (kWriteE) epi::store(e_out + row * cols + j, j == target_col ? 0.f : e * inw);
  }
  tsum = epi::block_reduce<false>(tsum, red_sum);
  if (threadIdx.x == 0) {
    // 0 while nothing was accumulated (m_old = -inf), never exp(-inf - -inf) = NaN.
    const float alpha = m_old == -CUDART_INF_F ? 0.f : expf(m_old - m_new);
    l[row] = l[row] * alpha + tsum;
    m[row] = m_new;
    if (kWriteE) alpha_out[row] = alpha;
  }
}

// Block = one row; no shared memory, no barriers. Null outputs are skipped.
template <typename TP>
__global__ void __launch_bounds__(epi::kThreads)
    grads_epilogue_kernel(const float* __restrict__ scores, int64_t cols,
                          const float* __restrict__ inv_nx, const float* __restrict__ inv_nw,
                          const int64_t* __restrict__ labels,
                          int64_t c0, float scale,
                          const float* __restrict__ lse, const float* __restrict__ row_coef,
                          TP* __restrict__ p_out, TP* __restrict__ pw_out) {
  const int64_t row = blockIdx.x;
  const float rc = row_coef[row];
  TP* p = p_out ? p_out + row * cols : nullptr;
  TP* pw = pw_out ? pw_out + row * cols : nullptr;
  if (rc == 0.f) {  // ignored rows / zero upstream gradient: the GEMMs still read the zeros
    for (int64_t j = threadIdx.x; j < cols; j += epi::kThreads) {
      if (p) epi::store(p + j, 0.f);
      if (pw) epi::store(pw + j, 0.f);
    }
    return;
  }
  const float* s = scores + row * cols;
  const float inx = inv_nx[row], lse_r = lse[row];
  const int64_t target_col = labels[row] < 0 ? -1 : labels[row] - c0;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < cols; j += epi::kThreads) {
    const float inw = inv_nw[j];
    const float e =
        j == target_col ? 0.f : expf(epi::logit(s[j], scale, inx, inw, j, target_col) - lse_r);
    if (p) epi::store(p + j, rc * e);
    if (pw) epi::store(pw + j, e * inw);
  }
}

}  // namespace
}  // namespace bct_fast
