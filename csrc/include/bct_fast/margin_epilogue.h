// Launchers of the margin-softmax "epilogue" provider: everything after the GEMM.
//
// The caller computes each raw score block S[B, cols] = x @ w[c0 : c0 + cols]^T with a library
// GEMM (cuBLAS through torch.mm: bf16 or fp32 operands, fp32 output) and these kernels turn it
// into the loss statistics / gradient coefficients. Logits, as in margin_softmax.h:
//   z_ij = scale * S_ij * inv_nx_i * inv_nw_j       (evaluated in this order, in fp32)
// except at the target column c0 + j == labels_i (labels_i < 0: none), which both launchers leave
// out: the statistics are those of the other columns and the coefficient blocks hold 0 there.
// The caller combines them with the target logit in float64 (the loss lse - z_y and p_y - 1 of a
// well-classified row without cancellation). The inverse norms are applied here, not to the
// GEMM operands, so the GEMM reads the caller's x and w as they are (no normalized copy of w).
// All pointers are device pointers of contiguous row-major arrays; `inv_nw` points at the
// chunk's first class (inv_nw[0] belongs to class c0). Per-row vectors have B entries.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

// Online-softmax merge of one score block into the running per-row statistics (in place):
//   m_new = max(m_i, max_j z_ij),   alpha_i = exp(m_i - m_new)   (0 while m_i = -inf)
//   l_i <- l_i * alpha_i + sum_j exp(z_ij - m_new),   m_i <- m_new
// With e_out (B x cols, fp32 or bf16 per e_dtype) it also writes the block that feeds the
// softmax-weighted-sum GEMM, e_ij = exp(z_ij - m_new) * inv_nw_j, and alpha_out[i] = alpha_i,
// so that acc <- acc * alpha + e @ w_chunk (raw w: inv_nw is folded into e). e_out and
// alpha_out are both given or both null. A row whose logits are all -inf keeps m = -inf, l = 0.
// m, l and e leave each row's target column out (e is 0 there).
Status margin_epilogue_stats(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                             const float* inv_nw, const int64_t* labels,
                             int64_t c0, float scale, float* m,
                             float* l, void* e_out, DType e_dtype, float* alpha_out,
                             void* stream);

// Backward coefficients of one score block, from the forward's lse and the per-row upstream
// coefficient row_coef:
//   p_out[i, j]  = row_coef_i * exp(z_ij - lse_i)        (feeds gw_chunk = p^T @ x_hat)
//   pw_out[i, j] = exp(z_ij - lse_i) * inv_nw_j           (feeds gx += pw @ w_chunk; the caller
//                                                          scales gx by row_coef at the end)
// Both are 0 in each row's target column (the caller adds that column's coefficient in float64;
// lse is the full one, target included). Rows with row_coef_i == 0 get zeros in both (their lse
// is not read).
// Either output may be
// null (not needed), not both; both have out_dtype (fp32 or bf16), B x cols.
Status margin_epilogue_grads(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                             const float* inv_nw, const int64_t* labels,
                             int64_t c0, float scale,
                             const float* lse, const float* row_coef, void* p_out, void* pw_out,
                             DType out_dtype, void* stream);

}  // namespace bct_fast
