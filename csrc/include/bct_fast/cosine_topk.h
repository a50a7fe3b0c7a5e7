// Launcher for the fused exact top-k cosine search (queries x gallery chunk).
//
// Scores s_qj = <q_q, g_j> * inv_nq_q * inv_ng_j are computed tile by tile and reduced on chip
// to each query's best k; the Q x N score matrix is never written. The gallery rows are cut
// into `splits` contiguous ranges (so small query batches still fill the GPU); each split
// writes its own sorted top-k and the caller merges the splits.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

// Largest k the kernel serves; bigger k takes the chunked PyTorch path.
constexpr int kTopkMaxK = 4096;

// Inputs: q [Q, d] (dtype q_dtype), g [N, d] (dtype g_dtype), both row-major contiguous.
//   q_dtype == g_dtype, or q_dtype == kFloat32 with any g_dtype (bf16 / fp16 galleries).
//   inv_nq [Q], inv_ng [N]: fp32 reciprocal norms, or nullptr for 1 (inner product).
//   exclude: query r never matches gallery row r + exclude_offset (leave-one-out; the offset
//   may be negative).
//   Requires 1 <= k <= kTopkMaxK, k <= N, N < 2^31.
// Outputs: out_scores [splits, Q, k] fp32 and out_idx [splits, Q, k] int64 (row in g), each
//   list sorted by score descending, ties to the lower index; slots a split cannot fill hold
//   (-inf, -1). *nonfinite is set to 1 when any score is NaN/inf (never cleared here).
Status cosine_topk_partial(const void* q, const void* g, const float* inv_nq, const float* inv_ng,
                           int64_t Q, int64_t N, int64_t d, DType q_dtype, DType g_dtype, int k,
                           int splits, bool exclude, int64_t exclude_offset, float* out_scores,
                           int64_t* out_idx, int* nonfinite, void* stream);

}  // namespace bct_fast
