// Launcher of the cosine top-k "epilogue" provider: the selection after the GEMM.
//
// The caller computes each raw score block S[rows, cols] = q_block @ g[n0 : n0 + cols]^T with a
// library GEMM (cuBLAS through torch.mm: fp32 output) and this kernel folds the block into each
// row's running top-k list, in place. The score of column j of row r is
//   v = S[r, j] (* inv_nq[r] if given) (* inv_ng[j] if given)       (in this order, in fp32)
// and -0.0 is read as +0.0 (zero scores tie, as in IEEE comparisons).
// Running lists: run_s[rows, k] (fp32), run_i[rows, k] (int64 global gallery indices), sorted by
// score descending, equal scores by ascending index, the valid entries a prefix and the rest
// padding (-inf, -1); the caller starts them as all padding. After the call each list is the
// top-k of (its old entries) U (this block's row), with that same order. The chunks must be fed
// in ascending gallery order: every index of a list is below n0 (so a list entry wins a tie
// against the block, whose global indices are n0 + j).
// exclude: column self_col0 + r of row r is skipped (query r of the block is that gallery row;
// self_col0 may place it outside the block). A NaN or +-inf score anywhere else sets
// *nonfinite = 1 (never cleared: the caller zeroes it once and checks it at the end) and is
// never selected. All pointers are device pointers of contiguous arrays.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

constexpr int kTopkEpilogueMaxK = 4096;

// Requires 1 <= k <= kTopkEpilogueMaxK, rows < 2^31, cols < 2^31.
Status topk_epilogue_select(const float* scores, int64_t rows, int64_t cols, const float* inv_nq,
                            const float* inv_ng, int k, int64_t n0, bool exclude,
                            int64_t self_col0, float* run_s, int64_t* run_i, int* nonfinite,
                            void* stream);

}  // namespace bct_fast
