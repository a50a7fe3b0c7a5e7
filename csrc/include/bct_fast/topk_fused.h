// Launchers of the fused tensor-core top-k cosine search (issue 15, part 4).
//
// For queries q [Q, d] and one gallery chunk g [N, d] (bf16, contiguous row-major) the score of
// query r and chunk row j is
//   v = S_rj (* inv_nq[r] if inv_nq) (* inv_ng[j] if inv_ng)     (fp32, in this order),
// S = q_r . g_j accumulated in fp32 on the tensor cores (mma.sync m16n8k16 bf16; needs sm_80);
// -0.0 is read as +0.0. The Q x N score matrix is never written: each block keeps its queries'
// best candidates in shared memory, filtered by their running k-th score.
//
// The call folds the chunk into running lists, with the contract of topk_epilogue.h:
// run_s [Q, k] (fp32), run_i [Q, k] (int64 global indices, chunk row j = n0 + j), sorted by score
// descending, equal scores by ascending index, the valid entries a prefix and the rest padding
// (-inf, -1); the caller starts them as all padding and feeds chunks in ascending gallery order
// (every index already in a list is below n0). After the call each list is the top-k of (its
// old entries) U (the chunk's scores of its query), in that order.
// exclude: chunk row self_col0 + r is skipped for query r (self_col0 may place it outside the
// chunk). A NaN or +-inf score anywhere else sets *nonfinite = 1 (never cleared) and is never
// selected.
//
// Parallelism: grid = ceil(Q / rows per block) query tiles x `splits` ranges of the chunk; each
// block writes its per-split partial lists into `workspace`, and a second kernel merges the
// splits into the running lists. The result does not depend on the thread schedule or on
// `splits` (an exact selection of the same fp32 scores). All pointers are device pointers.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

constexpr int kTopkFusedMaxK = 128;

// Requires dtype == kBFloat16, 1 <= k <= kTopkFusedMaxK, 1 <= Q, N < 2^31, d >= 1, n0 >= 0,
// splits >= 1 (clamped to the chunk's number of column tiles) and a workspace of at least
// topk_fused_workspace_bytes(Q, splits, k) bytes (checked against workspace_bytes), 8-byte
// aligned (it holds uint64 entries; a torch allocation is 256-byte aligned).
// Shared memory per block: k <= 32: 150544 bytes, k <= 64: 162832 (fits an A100's 163 KiB),
// k <= 128: 228368 (an H100's 227 KiB; on a device with less the call returns an error).
// q and g take cp.async loads when d % 8 == 0 and both are 16-byte aligned, plain loads otherwise
// (same results).
Status topk_fused_search(const void* q, const void* g, DType dtype, int64_t Q, int64_t N, int64_t d,
                         const float* inv_nq, const float* inv_ng, int k, int64_t n0, bool exclude,
                         int64_t self_col0, int64_t splits, void* workspace,
                         int64_t workspace_bytes, float* run_s, int64_t* run_i, int* nonfinite,
                         void* stream);

// A split count from the shapes only (no device query): enough blocks to fill a large GPU when
// Q is small, without making a split shorter than a few column tiles. Not tuned on hardware.
int64_t topk_fused_default_splits(int64_t Q, int64_t N);

int64_t topk_fused_workspace_bytes(int64_t Q, int64_t splits, int k);

}  // namespace bct_fast
