// Device code of the fused tensor-core top-k cosine search (launchers: topk_fused.cu; contract:
// topk_fused.h). In a header so the CPU emulator compiles the same code (tile_common.cuh).
//
// GEMM: the tile machinery of margin_fused_kernels.cuh (copied, that family is verified by its
// own hash): block = 128 query rows x one range of chunk columns (a split), 8 warps as 4 (rows)
// x 2 (columns), each warp 32 x 64 of every 128 x 128 score tile in 2 x 8 m16n8 fp32
// accumulators; the depth streams in 32-wide slices through a cp.async pipeline (iterations
// flattened over column tile x depth slice); ldmatrix from an 80-byte row pitch. d % 8 != 0 or
// unaligned q / g take a plain-load variant.
//
// Selection. Every entry is ordered by a 64-bit composite: the order-preserving uint32 image of
// its fp32 score (-0 read as +0) in the high word and 2^32 - 1 - o in the low word, o = its
// position in the running list (o < k) or k + j for chunk column j. Larger = better; all
// composites of a row are distinct (a strict total order: score descending, then index
// ascending, running-list entries first), and 0 is below every real one (padding).
// Per query row the block keeps in shared memory
//   kept[KMAX]  the best composites seen so far (sorted, best first; at most k of them),
//   thr         kept[k - 1] once k are kept, else thr_run = the running list's k-th composite
//               (0 if the list is not full): a chunk column can only enter the result when its
//               composite is above thr,
//   buf[kBuf]   candidates of the current tile, appended through an atomic cursor.
// After each complete score tile the accumulators become scores in place (invalid ones -inf:
// excluded, past the split's end, rows past Q, non-finite -> the nonfinite flag). Each valid
// score is "pending" (a bit per accumulator). Rounds: every thread re-tests its pending scores
// against the current thresholds (dropping those at or below) and pushes the others into the
// row's buffer; one that finds the buffer full stays pending. Barrier; one warp per row merges
// the row's buffer into kept (ranks by counting / binary search under the strict order), updates
// thr, resets the cursor. Barrier; repeat while any thread still has pending scores. A round
// either empties every pending bit or inserts a full buffer, so the loop terminates; thresholds
// only grow, so a score dropped against a threshold is never in the final top-k. The kept list is
// the exact top-k of the inserted set whatever the order of insertion (deterministic).
// KMAX (the kept lists' capacity) is 32, 64 or 128, the smallest >= k (launcher's dispatch).
// At the end the block writes each row's kept list (k composites, 0-padded; an empty list as its
// first entry 0 only) into the workspace slot of its split; topk_fused_merge_kernel (one block
// per query) folds the non-empty partial lists, in split order, into the running list (rank
// merges of two sorted lists by binary search), then decodes composites to (score, index).
#pragma once
#include "mma_common.cuh"
#include "tile_common.cuh"
#include "topk_order.cuh"

// BCT_FAST_EMU_BREAK_TOPK_PENDING (emulator self-test only): a score that finds its row's buffer
// full is dropped instead of staying pending (tests/ops/test_topk_fused_emulated.py must catch
// it). BCT_FAST_EMU_BREAK_TIE_ORDER (topk_order.cuh) sends ties to the higher index.

namespace bct_fast {
namespace {  // private to the one .cu (or emulator TU) that includes this header

namespace tkf {

constexpr int kWarpsM = 4, kWarpsN = 2;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;      // 256
constexpr int kMI = 2;                     // m16 tiles per warp (32 rows)
constexpr int kNI = 8;                     // n8 tiles per warp (64 columns)
constexpr int kBM = kWarpsM * kMI * 16;    // 128 query rows per block
constexpr int kBN = kWarpsN * kNI * 8;     // 128 chunk columns per tile
constexpr int kBK = 32;                    // depth slice per pipeline stage
constexpr int kLd = kBK + 8;               // smem row pitch (bf16): 80 bytes, conflict-free ldmatrix
constexpr int kStageElems = (kBM + kBN) * kLd;
constexpr int kStageBytes = kStageElems * 2;  // 20480
constexpr int kBuf = 32;                      // candidate buffer per row (one per lane at merge)
constexpr int kMergeThreads = 128;            // >= kTopkFusedMaxK: one list entry per thread
constexpr int kMaxK = 128;

static_assert(kBuf == 32, "the merge gives one buffer entry to each lane");
static_assert(kMergeThreads >= kMaxK, "the merge kernel holds one entry per thread");

// Per-row selection state, after the pipeline stages in dynamic shared memory.
template <int KMAX>
struct RowState {
  uint64_t kept[kBM][KMAX];
  uint64_t buf[kBM][kBuf];
  uint64_t thr[kBM];
  uint64_t thr_run[kBM];
  int cnt[kBM];
  int cursor[kBM];
  int flag[4];  // "some thread still has pending scores", by round parity
};

// The pipeline depth next to the row state. Dynamic smem: KMAX 32 -> 4 stages, 150544 bytes;
// 64 -> 3 stages, 162832 (both fit the 163 KiB of an A100); 128 -> 3 stages, 228368 (an H100's
// 227 KiB; more than an A100 allows: the launcher refuses k > 64 there).
template <int KMAX>
struct Config {
  static constexpr int kStages = KMAX <= 32 ? 4 : 3;
  static constexpr int kSmemBytes =
      kStages * kStageBytes + static_cast<int>(sizeof(RowState<KMAX>));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one block");
  static_assert(KMAX > 64 || kSmemBytes <= 163 * 1024, "k <= 64 must fit an A100");
};

// ---- ordering (topk_order.cuh) ---------------------------------------------------------------
using topk_order::composite;
using topk_order::key_of;
using topk_order::order_of;
using topk_order::value_of;

// Number of entries of the descending, distinct a[0, n) that are > x.
__device__ __forceinline__ int count_greater(const uint64_t* a, int n, uint64_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a[mid] > x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

}  // namespace tkf

// Partial top-k lists of query rows [blockIdx.x * kBM, +kBM) over the chunk columns
// [blockIdx.y * tiles_per_split * kBN, +tiles_per_split * kBN) into
// ws[(blockIdx.y * Q + row) * k + t] (composites, best first, 0-padded).
template <int KMAX, bool kAsync>
__global__ void __launch_bounds__(tkf::kThreads, 1)
    topk_fused_partial_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ g,
                              int Q, int N, int d, const float* __restrict__ inv_nq,
                              const float* __restrict__ inv_ng, int k, bool exclude,
                              int64_t self_col0, int tiles_per_split,
                              const float* __restrict__ run_s, const int64_t* __restrict__ run_i,
                              uint64_t* __restrict__ ws, int* __restrict__ nonfinite) {
  using namespace tkf;
  constexpr int kStages = Config<KMAX>::kStages;
  constexpr int kPer = KMAX / 32;  // kept entries per lane in the merge
  BCT_DYNAMIC_SMEM(uint16_t, smem);
  RowState<KMAX>& st = *reinterpret_cast<RowState<KMAX>*>(
      reinterpret_cast<unsigned char*>(smem) + kStages * kStageBytes);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  // Indices fit in int: the launcher keeps Q + kBM and N + kBN below 2^31.
  const int m0 = static_cast<int>(blockIdx.x) * kBM;
  const int c_begin = static_cast<int>(blockIdx.y) * tiles_per_split * kBN;
  const int c_end = N - c_begin < tiles_per_split * kBN ? N : c_begin + tiles_per_split * kBN;
  const int n_tiles = (c_end - c_begin + kBN - 1) / kBN;
  const int nk = (d + kBK - 1) / kBK;
  const int total = n_tiles * nk;
  const bool rows_live = m0 + wm * (kMI * 16) < Q;

  // Row state: empty kept lists; thresholds from the running lists' k-th entries.
  for (int lr = tid; lr < kBM; lr += kThreads) {
    uint64_t t = 0;
    const int64_t row = static_cast<int64_t>(m0) + lr;
    if (row < Q && run_i[row * k + k - 1] >= 0) {
      // The list's own key, as topk_epilogue reads it (the lists never hold -0).
      t = composite(key_of(run_s[row * k + k - 1]), static_cast<uint32_t>(k - 1));
    }
    st.thr_run[lr] = t;
    st.thr[lr] = t;
    st.cnt[lr] = 0;
    st.cursor[lr] = 0;
  }
  if (tid < 4) st.flag[tid] = 0;

  // This thread's 4 rows (r = 2 mi + h: row g + 8h of m16 tile mi), block-local.
  int lrow[kMI * 2];
  bool row_ok[kMI * 2];
  float inq[kMI * 2];
  int64_t self_col[kMI * 2];  // chunk column excluded for the row; -1: none
#pragma unroll
  for (int r = 0; r < kMI * 2; ++r) {
    lrow[r] = wm * (kMI * 16) + (r / 2) * 16 + mma::acc_row(lane, 2 * (r % 2));
    const int row = m0 + lrow[r];
    row_ok[r] = row < Q;
    inq[r] = row_ok[r] && inv_nq != nullptr ? inv_nq[row] : 1.f;
    self_col[r] = exclude ? self_col0 + row : -1;
  }
  bool bad = false;
  int round = 0;
  float acc[kMI][kNI][4];

  auto load_stage = [&](int it) {
    const int tile = it / nk, k0 = (it % nk) * kBK;
    uint16_t* qs = smem + (it % kStages) * kStageElems;
    const int col0 = c_begin + tile * kBN;
    mma::load_slice<kBM, kBK, kLd, kThreads, kAsync>(qs, q, m0, Q - m0, d, k0);
    mma::load_slice<kBN, kBK, kLd, kThreads, kAsync>(qs + kBM * kLd, g, col0, c_end - col0, d,
                                                     k0);
  };

#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) load_stage(s);
    mma::cp_async_commit();  // empty groups keep the group count uniform
  }

  int kc = 0, tile = 0;
#pragma unroll 1
  for (int it = 0; it < total; ++it) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < total) load_stage(it + kStages - 1);
    mma::cp_async_commit();

    const int col0 = c_begin + tile * kBN;
    const bool live = rows_live && col0 + wn * (kNI * 8) < c_end;  // warp-uniform
    if (kc == 0) {
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
    }
    if (live) {
      const uint16_t* qs = smem + (it % kStages) * kStageElems + (wm * kMI * 16) * kLd;
      const uint16_t* gs = smem + (it % kStages) * kStageElems + (kBM + wn * kNI * 8) * kLd;
      mma::warp_tile_mma<kMI, kNI, kBK, kLd>(acc, qs, gs, lane);
    }

    if (kc == nk - 1) {  // block-uniform: the score tile is complete
      // Scores in place of the accumulators; invalid ones -inf. Bit (mi * kNI + ni) * 4 + i of
      // `pend`: acc[mi][ni][i] is a valid score not yet pushed or dropped.
      uint64_t pend = 0;
      if (live) {
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = col0 + wn * (kNI * 8) + ni * 8 + mma::acc_col(lane, e);
            const bool col_ok = col < c_end;
            const float ing = col_ok && inv_ng != nullptr ? inv_ng[col] : 1.f;
#pragma unroll
            for (int r = 0; r < kMI * 2; ++r) {
              const int i = 2 * (r % 2) + e;
              float& a = acc[r / 2][ni][i];
              // topk_epilogue's order: S * inv_nq * inv_ng, fp32 (a factor of 1 is exact).
              const float v = a * inq[r] * ing;
              const bool use = col_ok && row_ok[r] && col != self_col[r];
              if (use && !isfinite(v)) bad = true;
              const bool ok = use && isfinite(v);
              a = ok ? (v == 0.f ? 0.f : v) : -CUDART_INF_F;
              if (ok) pend |= 1ull << ((r / 2 * kNI + ni) * 4 + i);
            }
          }
      }
      for (;;) {
        // Push: re-test against the current thresholds, append while the buffer has room.
        if (pend != 0) {
          uint64_t th[kMI * 2];
#pragma unroll
          for (int r = 0; r < kMI * 2; ++r) th[r] = st.thr[lrow[r]];
#pragma unroll
          for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
            for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const uint64_t bit = 1ull << ((mi * kNI + ni) * 4 + i);
                if (pend & bit) {
                  const int r = 2 * mi + i / 2;
                  const int col = col0 + wn * (kNI * 8) + ni * 8 + mma::acc_col(lane, i);
                  const uint64_t c = composite(key_of(acc[mi][ni][i]), static_cast<uint32_t>(k + col));
                  if (c <= th[r]) {
                    pend &= ~bit;
                  } else {
                    const int pos = atomicAdd(&st.cursor[lrow[r]], 1);
                    if (pos < kBuf) {
                      st.buf[lrow[r]][pos] = c;
                      pend &= ~bit;
                    }
#ifdef BCT_FAST_EMU_BREAK_TOPK_PENDING  // emulator self-test: overflowing scores are lost
                    pend &= ~bit;
#endif
                  }
                }
              }
        }
        if (pend != 0) atomicAdd(&st.flag[round & 1], 1);
        __syncthreads();
        // Merge: warp w takes rows w, w + 8, ...; buffer entry `lane`, kept entries lane + 32p.
#pragma unroll 1
        for (int lr = warp; lr < kBM; lr += kWarps) {
          const int n_raw = st.cursor[lr];  // same value in every lane: warp-uniform
          if (n_raw == 0) continue;
          const int n = n_raw < kBuf ? n_raw : kBuf;
          const int cnt = st.cnt[lr];
          const uint64_t* bufr = st.buf[lr];
          uint64_t* kept = st.kept[lr];
          const uint64_t b = lane < n ? bufr[lane] : 0;
          int pb = count_greater(kept, cnt, b);  // b's rank in the merged list
          uint64_t e[kPer];
          int pe[kPer];
#pragma unroll
          for (int p = 0; p < kPer; ++p) {
            const int o = lane + 32 * p;
            e[p] = o < cnt ? kept[o] : 0;
            pe[p] = o;
          }
#pragma unroll 1
          for (int m = 0; m < n; ++m) {
            const uint64_t x = bufr[m];
            pb += x > b;
#pragma unroll
            for (int p = 0; p < kPer; ++p) pe[p] += x > e[p];
          }
          __syncwarp();  // every lane has read kept[] before any lane rewrites it
#pragma unroll
          for (int p = 0; p < kPer; ++p) {
            const int o = lane + 32 * p;
            if (o < cnt && pe[p] != o && pe[p] < k) kept[pe[p]] = e[p];
          }
          if (lane < n && pb < k) kept[pb] = b;
          __syncwarp();
          if (lane == 0) {
            const int nc = cnt + n < k ? cnt + n : k;
            st.cnt[lr] = nc;
            st.thr[lr] = nc == k ? kept[k - 1] : st.thr_run[lr];
            st.cursor[lr] = 0;
          }
        }
        const bool again = st.flag[round & 1] != 0;
        if (tid == 0) st.flag[(round + 1) & 1] = 0;  // the next round's flag, last read a round ago
        ++round;
        __syncthreads();
        if (!again) break;
      }
    }
    if (++kc == nk) kc = 0, ++tile;
  }

  mma::cp_async_wait<0>();  // only empty groups can be left; retire them
  // The last round ended with a barrier: the kept lists are final. An empty list is written as
  // its first entry only (0: the merge skips it); a non-empty one in full, 0-padded.
  for (int e = tid; e < kBM * k; e += kThreads) {
    const int lr = e / k, t = e % k;
    const int64_t row = static_cast<int64_t>(m0) + lr;
    const int cnt = st.cnt[lr];
    if (row < Q && (cnt > 0 || t == 0))
      ws[(static_cast<int64_t>(blockIdx.y) * Q + row) * k + t] = t < cnt ? st.kept[lr][t] : 0;
  }
  if (bad) *nonfinite = 1;  // every writer stores the same value
}

// One block per query row: folds the `splits` partial lists (ws, in split order) into the
// running list (run_s, run_i; in place). Chunk composites carry order k + j (global index
// n0 + j), list entries their position.
__global__ void __launch_bounds__(tkf::kMergeThreads)
    topk_fused_merge_kernel(const uint64_t* __restrict__ ws, int64_t Q, int splits, int k,
                            int64_t n0, float* __restrict__ run_s, int64_t* __restrict__ run_i) {
  using namespace tkf;
  __shared__ uint64_t cur[2][kMaxK];
  __shared__ uint64_t nxt[kMaxK];
  __shared__ int64_t old_i[kMaxK];
  __shared__ int live[kMergeThreads];  // split s0 + i has a non-empty partial list
  const int t = static_cast<int>(threadIdx.x);
  const int64_t row = blockIdx.x;
  if (t < k) {
    const int64_t idx = run_i[row * k + t];
    old_i[t] = idx;
    cur[0][t] = idx >= 0 ? composite(key_of(run_s[row * k + t]), static_cast<uint32_t>(t)) : 0;
  }
  __syncthreads();
  int c = 0;  // cur[c] holds the list
#pragma unroll 1
  for (int s0 = 0; s0 < splits; s0 += kMergeThreads) {
    // Which of the next kMergeThreads splits have entries: one parallel read of their first
    // entries instead of a dependent load per split.
    live[t] = s0 + t < splits && ws[(static_cast<int64_t>(s0 + t) * Q + row) * k] != 0;
    __syncthreads();
    const int s_end = splits - s0 < kMergeThreads ? splits : s0 + kMergeThreads;
#pragma unroll 1
    for (int s = s0; s < s_end; ++s) {
      if (!live[s - s0]) continue;  // block-uniform
      const uint64_t* part = ws + (static_cast<int64_t>(s) * Q + row) * k;
      if (t < k) {
        nxt[t] = part[t];
        cur[c ^ 1][t] = 0;
      }
      __syncthreads();
      if (t < k) {
        const uint64_t a = cur[c][t], b = nxt[t];
        if (a != 0) {
          const int pos = t + count_greater(nxt, k, a);
          if (pos < k) cur[c ^ 1][pos] = a;
        }
        if (b != 0) {
          const int pos = t + count_greater(cur[c], k, b);
          if (pos < k) cur[c ^ 1][pos] = b;
        }
      }
      __syncthreads();
      c ^= 1;
    }
    __syncthreads();  // live[] is rewritten for the next group of splits
  }
  if (t < k) {
    const uint64_t x = cur[c][t];
    float v = -CUDART_INF_F;
    int64_t idx = -1;
    if (x != 0) {
      v = value_of(static_cast<uint32_t>(x >> 32));
      const uint32_t o = order_of(x);
      idx = o < static_cast<uint32_t>(k) ? old_i[o] : n0 + static_cast<int64_t>(o - k);
    }
    run_s[row * k + t] = v;
    run_i[row * k + t] = idx;
  }
}

}  // namespace
}  // namespace bct_fast
