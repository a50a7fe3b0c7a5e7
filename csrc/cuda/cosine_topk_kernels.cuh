// Device code of the fused top-k search (launcher and design notes: cosine_topk.cu). Kept in a
// header so the CPU emulator compiles the same code (see tile_common.cuh).
#pragma once
#include <climits>

#include "tile_common.cuh"

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

using tile::kThreads;
using tile::to_float;

constexpr int kNT = 64;  // gallery rows per tile
constexpr int kDK = 32;  // depth per smem stage

__device__ __forceinline__ bool better(float as, int ai, float bs, int bi) {
  return as > bs || (as == bs && ai < bi);
}

template <int KCAP, int QT>
struct Smem {
  float qs[QT][kDK + 1];
  float gs[kNT][kDK + 1];
  float sc[QT][kNT];
  float list_s[QT][2 * KCAP];
  int list_i[QT][2 * KCAP];
  int cnt[QT];
  float thr_s[QT];
  int thr_i[QT];
};

// Bitonic sort of each query's 2*KCAP entries, best first; then empty the buffer half and
// refresh the admission threshold (the k-th best so far).
template <int KCAP, int QT>
__device__ void merge_lists(Smem<KCAP, QT>& sm, int k) {
  constexpr int L = 2 * KCAP;
  for (int size = 2; size <= L; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < QT * (L / 2); t += kThreads) {
        const int q = t / (L / 2), p = t % (L / 2);
        const int i = 2 * stride * (p / stride) + (p % stride), j = i + stride;
        const bool best_first = (i & size) == 0;
        const float si = sm.list_s[q][i], sj = sm.list_s[q][j];
        const int ii = sm.list_i[q][i], ij = sm.list_i[q][j];
        const bool swap = best_first ? better(sj, ij, si, ii) : better(si, ii, sj, ij);
        if (swap) {
          sm.list_s[q][i] = sj;
          sm.list_s[q][j] = si;
          sm.list_i[q][i] = ij;
          sm.list_i[q][j] = ii;
        }
      }
      __syncthreads();
    }
  }
  for (int t = threadIdx.x; t < QT * KCAP; t += kThreads) {
    const int q = t / KCAP, p = KCAP + t % KCAP;
    sm.list_s[q][p] = -CUDART_INF_F;
    sm.list_i[q][p] = INT_MAX;
  }
  for (int q = threadIdx.x; q < QT; q += kThreads) {
    sm.cnt[q] = 0;
    sm.thr_s[q] = sm.list_s[q][k - 1];
    sm.thr_i[q] = sm.list_i[q][k - 1];
  }
  __syncthreads();
}

template <typename TQ, typename TG, int KCAP, int QT>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(const TQ* __restrict__ q, const TG* __restrict__ g, const float* __restrict__ inv_nq,
                const float* __restrict__ inv_ng, int64_t Q, int64_t N, int64_t d, int k,
                int64_t rows_per_split, bool exclude, int64_t exclude_offset, float* __restrict__ out_s,
                int64_t* __restrict__ out_i, int* __restrict__ nonfinite) {
  BCT_DYNAMIC_SMEM(unsigned char, smem_raw);
  Smem<KCAP, QT>& sm = *reinterpret_cast<Smem<KCAP, QT>*>(smem_raw);
  constexpr int kPer = (QT * kNT + kThreads - 1) / kThreads;  // scores per thread per tile

  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * QT;
  const int split = blockIdx.y;
  const int64_t n_begin = split * rows_per_split;
  const int64_t n_end = min(N, n_begin + rows_per_split);

  for (int t = threadIdx.x; t < QT * 2 * KCAP; t += kThreads) {
    sm.list_s[t / (2 * KCAP)][t % (2 * KCAP)] = -CUDART_INF_F;
    sm.list_i[t / (2 * KCAP)][t % (2 * KCAP)] = INT_MAX;
  }
  for (int r = threadIdx.x; r < QT; r += kThreads) {
    sm.cnt[r] = 0;
    sm.thr_s[r] = -CUDART_INF_F;
    sm.thr_i[r] = INT_MAX;
  }
  __syncthreads();

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNT) {
    float acc[kPer];
#pragma unroll
    for (int r = 0; r < kPer; ++r) acc[r] = 0.f;
    for (int64_t k0 = 0; k0 < d; k0 += kDK) {
      for (int e = threadIdx.x; e < QT * kDK; e += kThreads) {
        const int r = e / kDK, c = e % kDK;
        const int64_t row = q0 + r, col = k0 + c;
        sm.qs[r][c] = (row < Q && col < d) ? to_float(q[row * d + col]) : 0.f;
      }
      for (int e = threadIdx.x; e < kNT * kDK; e += kThreads) {
        const int r = e / kDK, c = e % kDK;
        const int64_t row = n0 + r, col = k0 + c;
        sm.gs[r][c] = (row < n_end && col < d) ? to_float(g[row * d + col]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const int o = threadIdx.x + r * kThreads;
        if (o < QT * kNT) {
          const int qi = o / kNT, j = o % kNT;
#pragma unroll 8
          for (int c = 0; c < kDK; ++c) acc[r] = fmaf(sm.qs[qi][c], sm.gs[j][c], acc[r]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < QT * kNT) sm.sc[o / kNT][o % kNT] = acc[r];
    }
    // Make room: a query may add up to kNT candidates from this tile.
    bool full = false;
    for (int r = 0; r < QT; ++r) full |= sm.cnt[r] > KCAP - kNT;
    __syncthreads();  // sc visible; every thread has read cnt before a merge rewrites it
    if (full) merge_lists(sm, k);

    for (int e = threadIdx.x; e < QT * kNT; e += kThreads) {
      const int qi = e / kNT, j = e % kNT;
      const int64_t row = q0 + qi, col = n0 + j;
      if (row >= Q || col >= n_end) continue;
      if (exclude && col == row + exclude_offset) continue;
      float s = sm.sc[qi][j];
      if (inv_nq != nullptr) s *= inv_nq[row];
      if (inv_ng != nullptr) s *= inv_ng[col];
      if (!isfinite(s)) {
        *nonfinite = 1;  // benign race: every writer stores 1
        continue;
      }
      const int idx = static_cast<int>(col);
      if (better(s, idx, sm.thr_s[qi], sm.thr_i[qi])) {
        const int slot = atomicAdd(&sm.cnt[qi], 1);
        sm.list_s[qi][KCAP + slot] = s;
        sm.list_i[qi][KCAP + slot] = idx;
      }
    }
    __syncthreads();
  }
  merge_lists(sm, k);

  for (int t = threadIdx.x; t < QT * k; t += kThreads) {
    const int qi = t / k, r = t % k;
    const int64_t row = q0 + qi;
    if (row >= Q) continue;
    const int64_t o = (static_cast<int64_t>(split) * Q + row) * k + r;
    const float s = sm.list_s[qi][r];
    const bool real = sm.list_i[qi][r] != INT_MAX;
    out_s[o] = real ? s : -CUDART_INF_F;
    out_i[o] = real ? static_cast<int64_t>(sm.list_i[qi][r]) : -1;
  }
}

}  // namespace
}  // namespace bct_fast
