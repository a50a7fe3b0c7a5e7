// Launchers for the normalized-softmax (NormFace / CosFace / ArcFace) cross-entropy sweeps.
//
// Both launchers stream class tiles and never write the B x C logit matrix. The logits are
//   z_ij = scale * <x_i, w_j> * inv_nx_i * inv_nw_j          (cosine times scale)
// except at the target column j == labels_i (labels_i < 0: none), which both launchers leave
// out: the statistics are those of the other columns, the gradient sweep gives it 0. The caller
// combines them with the margin-adjusted target logit in float64 (the loss lse - z_y and p_y - 1
// of a well-classified row without cancellation).
// All statistics are fp32; x and w are fp32, fp16 or bf16 with the same dtype.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

// Per-(split, row) online-softmax statistics over the class range of each split:
//   m[s, i]   = max_j z_ij,   l[s, i] = sum_j exp(z_ij - m[s, i])
//   acc[s,i,:] = sum_j exp(z_ij - m[s, i]) * w_j * inv_nw_j      (only when acc != nullptr)
// all over j != labels_i.
// Classes are cut into `splits` contiguous ranges so that small batches still fill the GPU;
// the caller merges splits (log-sum-exp merge). An empty split writes m=-inf, l=0, acc=0.
// Layouts: m, l: [splits, B]; acc: [splits, B, d].
Status margin_softmax_stats(const void* x, const void* w, const float* inv_nx, const float* inv_nw,
                            const int64_t* labels, int64_t B, int64_t C,
                            int64_t d, DType dtype, float scale, int splits, float* m, float* l,
                            float* acc, void* stream);

// Weight-side gradient sweep (owner = class):
//   out[j, :] = sum_{i: labels_i != j} row_coef_i * exp(z_ij - lse_i) * x_i * inv_nx_i
//                                                                           out: [C, d] fp32
// lse is the full one (target included); rows with row_coef_i == 0 (ignored labels, zero
// upstream gradient) are skipped.
Status margin_softmax_grad_weight(const void* x, const void* w, const float* inv_nx,
                                  const float* inv_nw, const int64_t* labels,
                                  const float* lse,
                                  const float* row_coef, int64_t B, int64_t C, int64_t d,
                                  DType dtype, float scale, float* out, void* stream);

}  // namespace bct_fast
