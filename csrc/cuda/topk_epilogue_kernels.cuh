// Device code of the top-k epilogue provider (launcher: topk_epilogue.cu; contract:
// topk_epilogue.h). In a header so the CPU emulator compiles the same code (tile_common.cuh).
//
// Block = one row of the score block (256 threads), which the GEMM wrote just before (in L2).
// Every entry is ordered by a 64-bit composite key: the order-preserving uint32 image of its fp32
// score in the high word, and 2^32 - 1 - o in the low word, o = its position in the running list
// (o < k) or k + j for block column j. Larger composite = better; equal scores go to the lower o,
// i.e. the lower gallery index (list entries are below n0). All composites are distinct, so the
// result does not depend on the thread schedule.
//
//  1. Filter (one coalesced read of the row): a column is a candidate when its score is finite,
//     not excluded, and, once the list is full, strictly above the list's k-th score (an equal
//     score has a higher index and loses). Candidates are appended to shared memory (capacity
//     KCAP >= k) with an atomic cursor; no candidate: the block exits without writing.
//  2. Few candidates (C <= KCAP, every chunk after the first ones): all of them are kept.
//     Many (C > KCAP): a radix select over the composites of (list U candidates), 8 bits per
//     pass with a shared histogram, finds the k-th best; it stops as soon as the selected bin
//     holds exactly the entries still needed, usually after 2-3 passes of score bits (tie-heavy
//     rows go on into the position bits). The kept candidates (composite above the cut) are then
//     gathered by a second read of the row; the kept list entries are a prefix of the list.
//  3. The kept candidates (at most KCAP) are sorted by a bitonic sort in shared memory and merged
//     with the list by ranks (binary searches), truncated at k, written in place; list entries
//     whose position does not change are not rewritten.
// Why not a per-warp queue (WarpSelect): the running k-th score, known from the previous chunks,
// already filters all but ~k * cols / n0 columns per chunk, so the steady state is one read of
// the row and a compare per score; one algorithm then serves every k up to 4096, and the radix
// select (only in the first chunks) is exact for any k and any ties.
#pragma once
#include "tile_common.cuh"
#include "topk_order.cuh"

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

namespace tke {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;  // radix digit: 8 bits

using topk_order::composite;
using topk_order::key_of;
using topk_order::value_of;

template <int KCAP>
struct Smem {
  uint64_t cand[KCAP];  // candidates' composites (then sorted)
  uint32_t rkey[KCAP];  // the list's score keys, valid prefix
  uint32_t hist[kBins];
  int red[kWarps];
  int cursor;
  uint32_t digit, above, in_bin;
};

// Block-wide sum; all threads get it. Two barriers so `red` can be reused at once.
__device__ __forceinline__ int block_sum(int v, int* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  int r = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) r += red[i];
  __syncthreads();
  return r;
}

// The score of column j, or false when it is excluded or non-finite (then *bad is set).
struct Row {
  const float* s;
  const float* inv_ng;
  float inq;
  bool has_inq;
  int64_t self_col;  // -1 (or outside [0, cols)): none
  __device__ __forceinline__ bool score(int64_t j, float* v, bool* bad) const {
    if (j == self_col) return false;
    float x = s[j];
    if (has_inq) x = x * inq;
    if (inv_ng) x = x * inv_ng[j];
    if (!isfinite(x)) {
      *bad = true;
      return false;
    }
    *v = x == 0.f ? 0.f : x;  // -0 -> +0: zeros tie (by index) as in IEEE comparisons
    return true;
  }
};

// Column j's composite, when it is a candidate: finite, not excluded, its key above `thr`.
__device__ __forceinline__ bool candidate(const Row& r, int64_t j, int k, uint32_t thr, bool* bad,
                                          uint64_t* cp) {
  float v;
  if (!r.score(j, &v, bad)) return false;
  const uint32_t key = key_of(v);
  if (key <= thr) return false;
  *cp = composite(key, static_cast<uint32_t>(k + j));
  return true;
}

// Number of entries of the non-increasing a[0, n) that are >= key (or > key when kStrict).
template <bool kStrict, typename A>
__device__ __forceinline__ int count_before(const A& a, int n, uint32_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const uint32_t x = a(mid);
    if (kStrict ? x > key : x >= key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

}  // namespace tke

template <int KCAP>
__global__ void __launch_bounds__(tke::kThreads)
    topk_select_kernel(const float* __restrict__ scores, int64_t cols,
                       const float* __restrict__ inv_nq, const float* __restrict__ inv_ng, int k,
                       int64_t n0, bool exclude, int64_t self_col0, float* __restrict__ run_s,
                       int64_t* __restrict__ run_i, int* __restrict__ nonfinite) {
  using namespace tke;
  constexpr int kPer = (KCAP + kThreads - 1) / kThreads;
  BCT_DYNAMIC_SMEM(unsigned char, smem_raw);
  Smem<KCAP>& sm = *reinterpret_cast<Smem<KCAP>*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  float* rs = run_s + row * k;
  int64_t* ri = run_i + row * k;
  const Row r{scores + row * cols, inv_ng, inv_nq ? inv_nq[row] : 1.f, inv_nq != nullptr,
              exclude ? self_col0 + row : -1};

  // The list goes to registers (it is rewritten in place at the end) and its keys to smem.
  float my_s[kPer];
  int64_t my_i[kPer];
  int valid = 0;
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int o = tid + p * kThreads;
    my_i[p] = -1;
    if (o < k) {
      my_s[p] = rs[o];
      my_i[p] = ri[o];
      if (my_i[p] >= 0) {
        sm.rkey[o] = key_of(my_s[p]);
        ++valid;
      }
    }
  }
  if (tid == 0) sm.cursor = 0;
  const int R = block_sum(valid, sm.red);  // its barriers publish rkey and cursor
  const bool full = R == k;
  const uint32_t thr = full ? sm.rkey[k - 1] : 0u;

  // 1. Filter; candidates appended while they fit.
  int c = 0;
  bool bad = false;
  for (int64_t j = tid; j < cols; j += kThreads) {
    uint64_t cp;
    if (!candidate(r, j, k, thr, &bad, &cp)) continue;
    ++c;
    const int pos = atomicAdd(&sm.cursor, 1);
    if (pos < KCAP) sm.cand[pos] = cp;
  }
  if (bad) *nonfinite = 1;  // every writer stores the same value
  const int C = block_sum(c, sm.red);
  if (C == 0) return;

  int kept_list = R;  // list entries kept: a prefix
  int M = C;          // candidates kept
  if (C > KCAP) {
    // 2. Radix select of the k-th best composite over (list U candidates): R + C > KCAP >= k.
    uint64_t prefix = 0;
    int shift = 64;
    uint32_t need = static_cast<uint32_t>(k);
    for (int sh = 56; sh >= 0; sh -= 8) {
      const uint64_t hi_mask = shift >= 64 ? 0ull : (~0ull << shift);
      for (int b = tid; b < kBins; b += kThreads) sm.hist[b] = 0;
      __syncthreads();
      for (int o = tid; o < R; o += kThreads) {
        const uint64_t cp = composite(sm.rkey[o], static_cast<uint32_t>(o));
        if ((cp & hi_mask) == prefix) atomicAdd(&sm.hist[(cp >> sh) & 0xff], 1u);
      }
      for (int64_t j = tid; j < cols; j += kThreads) {
        uint64_t cp;
        if (candidate(r, j, k, thr, &bad, &cp) && (cp & hi_mask) == prefix)
          atomicAdd(&sm.hist[(cp >> sh) & 0xff], 1u);
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l holds bins 255 - 8l down to 248 - 8l (best first); find the bin where the
        // count of better-or-equal entries reaches `need`.
        uint32_t counts[8], sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          counts[i] = sm.hist[255 - 8 * tid - i];
          sum += counts[i];
        }
        uint32_t incl = sum;
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t up = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += up;
        }
        uint32_t cum = incl - sum;
        bool found = !(cum < need && need <= incl);  // exactly one lane holds the bin
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // unrolled, no break: counts[] stays in registers
          if (!found && cum + counts[i] >= need) {
            found = true;
            sm.digit = 255 - 8 * tid - i;
            sm.above = cum;
            sm.in_bin = counts[i];
          }
          if (!found) cum += counts[i];
        }
      }
      __syncthreads();
      prefix |= static_cast<uint64_t>(sm.digit) << sh;
      need -= sm.above;
      shift = sh;
      const bool done = sm.in_bin == need;  // the whole bin is kept: the cut is found
      __syncthreads();                      // sm.digit / in_bin are rewritten by the next pass
      if (done) break;
    }
    // Kept: composites whose top (64 - shift) bits are >= the prefix's; exactly k of them.
    const uint64_t cut = prefix >> shift;
    int kl = 0;
    for (int o = tid; o < R; o += kThreads)
      kl += (composite(sm.rkey[o], static_cast<uint32_t>(o)) >> shift) >= cut;
    kept_list = block_sum(kl, sm.red);
    M = k - kept_list;
    if (tid == 0) sm.cursor = 0;
    __syncthreads();
    for (int64_t j = tid; j < cols; j += kThreads) {
      uint64_t cp;
      if (candidate(r, j, k, thr, &bad, &cp) && (cp >> shift) >= cut)
        sm.cand[atomicAdd(&sm.cursor, 1)] = cp;
    }
  }

  // 3. Sort the kept candidates (best first; 0 pads to a power of two), merge by ranks.
  int P = 1;
  while (P < M) P <<= 1;
  for (int m = M + tid; m < P; m += kThreads) sm.cand[m] = 0;
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < P / 2; t += kThreads) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = sm.cand[lo], b = sm.cand[hi];
        if ((a < b) == desc) {
          sm.cand[lo] = b;
          sm.cand[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  const auto cand_key = [&](int m) { return static_cast<uint32_t>(sm.cand[m] >> 32); };
  const auto list_key = [&](int o) { return sm.rkey[o]; };
  // List entry o moves down by the candidates strictly better (a tie goes to the list).
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int o = tid + p * kThreads;
    if (o < kept_list) {
      const int pos = o + count_before<true>(cand_key, M, sm.rkey[o]);
      if (pos != o && pos < k) {
        rs[pos] = my_s[p];
        ri[pos] = my_i[p];
      }
    }
  }
  for (int m = tid; m < M; m += kThreads) {
    const uint64_t cp = sm.cand[m];
    const uint32_t key = static_cast<uint32_t>(cp >> 32);
    const int pos = m + count_before<false>(list_key, kept_list, key);
    if (pos < k) {
      rs[pos] = value_of(key);
      ri[pos] = n0 + (static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(cp)) - k);
    }
  }
}

}  // namespace
}  // namespace bct_fast
