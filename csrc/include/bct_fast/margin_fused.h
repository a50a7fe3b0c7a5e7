// Launchers of the fused tensor-core forward of the margin-softmax loss (issue 15, part 4).
//
// For x [B, d] and w [C, d] (bf16, contiguous row-major) the logits are, as in margin_epilogue.h:
//   z_ij = scale * S_ij * inv_nx_i * inv_nw_j      (S = x @ w^T accumulated in fp32; this order)
// over the columns j != labels_i (each row's target column is left out; labels_i < 0: none;
// the caller combines the result with the margin logit in float64), and
//   lse_i = log(sum_j exp(z_ij))                    (online max / sum-exp in fp32; the merge
//                                                     writes M + log L in double).
// One kernel computes S on tensor cores (mma.sync m16n8k16 bf16, fp32 accumulation; needs sm_80)
// and turns it into running statistics in registers: the B x C score matrix is never written.
//
// Parallelism: grid = ceil(B / 128) row tiles x `splits` class ranges (of whole 128-class tiles).
// Each block writes its partial (m, l) per row into `workspace`, and a second small kernel merges
// the splits: workspace = [m: splits x B | l: splits x B] floats. The result does not depend on
// the thread schedule (fixed reduction orders); it does depend on `splits` at the fp32-rounding
// level. x and w take the cp.async fast path when d % 8 == 0 and both are 16-byte aligned, a
// slower plain-load path otherwise (same results).
//
// All pointers are device pointers; per-row vectors have B entries, inv_nw has C.
#pragma once
#include <cstdint>

#include "bct_fast/common.h"

namespace bct_fast {

// Writes lse[B] (double). `dtype` must be kBFloat16. 1 <= splits; splits beyond the number of 128-class
// tiles are clamped (the workspace needs margin_fused_workspace_floats(B, splits) floats either
// way). workspace_floats is the caller's workspace size, checked.
Status margin_fused_lse(const void* x, const void* w, DType dtype, int64_t B, int64_t C, int64_t d,
                        const float* inv_nx, const float* inv_nw, const int64_t* labels,
                        float scale, int64_t splits, float* workspace,
                        int64_t workspace_floats, double* lse, void* stream);

// A split count that gives a few hundred blocks when B is small, without making a block's class
// range shorter than 4 tiles (512 classes). A function of the shapes only (no device query), so
// results are reproducible across GPUs. Not tuned on hardware yet.
int64_t margin_fused_default_splits(int64_t B, int64_t C);

inline int64_t margin_fused_workspace_floats(int64_t B, int64_t splits) { return 2 * splits * B; }

// Fragment-layout check of the tensor-core path, one warp: d = c + a @ b^T with a, b 16 x 16 bf16
// (b's rows are the "class" side, like w; both 16-byte aligned) and c, d 16 x 16 fp32, through
// the same cp.async -> ldmatrix -> mma code as the fused kernel. Compare with a host matmul: on a
// GPU this checks the layouts against the hardware, in the emulator against the PTX ISA text.
Status margin_fused_mma_tile_check(const void* a, const void* b, const float* c, float* d,
                                   void* stream);

// ---- the frozen classifier's forward: lse AND pws (docs/design_fused_frozen_forward.md, v1) ----
// With the logits z above (target column left out): lse[B] (double) and pws[B, d] =
// sum_j softmax_ij * w_hat_j, w_hat_j = w_j * inv_nw_j (fp32), in one kernel that computes
// S = x w^T AND P @ W on tensor cores (mma.sync; the B x C scores / probabilities never reach
// global memory): block = 64 rows x one class range of whole 64-class tiles, O (64 x d fp32) in
// registers split into depth panels over the warps. P' = exp(z - m) * inv_nw is rounded to bf16
// for the second product (as the epilogue provider's e block). A row
// whose logits are all -inf gets lse = -inf and pws = NaN (0 / 0), like the other providers.
// workspace = [m: splits x B | l: splits x B | O: splits x B x d] floats; the split merge has a
// fixed order (deterministic; depends on `splits` at the fp32-rounding level). x and w take the
// cp.async path when d % 8 == 0 and both are 16-byte aligned, plain loads otherwise.
// d <= margin_fused_pws_max_d (512; padded to 64 / 128 / 256 / 512 inside the kernel); larger d
// returns an error (route those to the epilogue provider).
constexpr int64_t kMarginFusedPwsMaxD = 512;

Status margin_fused_lse_pws(const void* x, const void* w, DType dtype, int64_t B, int64_t C,
                            int64_t d, const float* inv_nx, const float* inv_nw,
                            const int64_t* labels, float scale,
                            int64_t splits, float* workspace, int64_t workspace_floats, double* lse,
                            float* pws, void* stream);

// Splits giving ~256 blocks (about 2 waves at 1 block / SM on a 132-SM GPU; 16 splits at
// B = 1024) without making a split shorter than 4 tiles (256 classes). Shapes only
// (reproducible across GPUs); not tuned.
int64_t margin_fused_pws_default_splits(int64_t B, int64_t C);

inline int64_t margin_fused_pws_workspace_floats(int64_t B, int64_t d, int64_t splits) {
  return splits * B * (d + 2);
}

// PV-orientation fragment check, one warp: d = c + p @ w for p 16 x 16 bf16 (row-major), w
// 16 x 16 bf16 row-major [k][n] (16-byte aligned) and c, d 16 x 16 fp32, through the pws kernel's
// PV path: p as fp32 C fragments packed into the A fragment (bf16x2, even column low), w
// through cp.async -> ldmatrix.x4.trans. Compare with a host matmul.
Status margin_fused_pv_tile_check(const void* p, const void* w, const float* c, float* d,
                                  void* stream);

}  // namespace bct_fast
