// Normalized-softmax cross-entropy sweeps: online log-sum-exp (+ softmax-weighted sum of the
// normalized class rows) and the weight-side gradient. See margin_softmax.h for the contract.
#include "bct_fast/margin_softmax.h"
#include "launch_common.cuh"
#include "margin_softmax_kernels.cuh"

namespace bct_fast {
namespace {

using namespace tile;

// Largest tile (32, 16, ..., 1 rows) whose fp32 [tile][d] accumulator fits in shared memory.
int pick_tile(int64_t d, int static_bytes) {
  const int64_t budget = max_dynamic_smem(static_bytes);
  for (int t = kRows; t >= 1; t /= 2)
    if (t * d * static_cast<int64_t>(sizeof(float)) <= budget) return t;
  return 0;
}

template <typename T>
Status launch_stats(const T* x, const T* w, const float* inv_nx, const float* inv_nw,
                    const int64_t* labels, int64_t B, int64_t C,
                    int64_t d, float scale, int splits, float* m, float* l, float* acc,
                    cudaStream_t stream) {
  const int64_t per_split = ((C + splits - 1) / splits + kCols - 1) / kCols * kCols;
  if (acc == nullptr) {
    dim3 grid(static_cast<unsigned>((B + kRows - 1) / kRows), splits);
    stats_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, w, inv_nx, inv_nw, labels,
                                                          B, C, d, scale, kRows,
                                                          per_split, m, l, nullptr);
    return check_launch("margin_softmax_stats");
  }
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, stats_kernel<T, true>);
  const int rows = pick_tile(d, static_cast<int>(attr.sharedSizeBytes));
  if (rows == 0) return Status::Error("margin_softmax_stats: embedding dim too large for the kernel");
  const size_t smem = static_cast<size_t>(rows) * d * sizeof(float);
  cudaFuncSetAttribute(stats_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  dim3 grid(static_cast<unsigned>((B + rows - 1) / rows), splits);
  stats_kernel<T, true><<<grid, kThreads, smem, stream>>>(x, w, inv_nx, inv_nw, labels,
                                                          B, C, d, scale, rows,
                                                          per_split, m, l, acc);
  return check_launch("margin_softmax_stats");
}

template <typename T>
Status launch_grad_weight(const T* x, const T* w, const float* inv_nx, const float* inv_nw,
                          const int64_t* labels, const float* lse,
                          const float* row_coef, int64_t B, int64_t C, int64_t d, float scale,
                          float* out, cudaStream_t stream) {
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, grad_weight_kernel<T>);
  const int cols = pick_tile(d, static_cast<int>(attr.sharedSizeBytes));
  if (cols == 0)
    return Status::Error("margin_softmax_grad_weight: embedding dim too large for the kernel");
  const size_t smem = static_cast<size_t>(cols) * d * sizeof(float);
  cudaFuncSetAttribute(grad_weight_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       static_cast<int>(smem));
  const unsigned blocks = static_cast<unsigned>((C + cols - 1) / cols);
  grad_weight_kernel<T><<<blocks, kThreads, smem, stream>>>(
      x, w, inv_nx, inv_nw, labels, lse, row_coef, B, C, d, scale, cols, out);
  return check_launch("margin_softmax_grad_weight");
}

}  // namespace

Status margin_softmax_stats(const void* x, const void* w, const float* inv_nx, const float* inv_nw,
                            const int64_t* labels, int64_t B, int64_t C,
                            int64_t d, DType dtype, float scale, int splits, float* m, float* l,
                            float* acc, void* stream) {
  if (B <= 0 || C <= 0 || d <= 0 || splits <= 0)
    return Status::Error("margin_softmax_stats: sizes must be positive");
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_stats(static_cast<const float*>(x), static_cast<const float*>(w), inv_nx,
                          inv_nw, labels, B, C, d, scale, splits, m, l, acc, s);
    case DType::kFloat16:
      return launch_stats(static_cast<const __half*>(x), static_cast<const __half*>(w), inv_nx,
                          inv_nw, labels, B, C, d, scale, splits, m, l, acc, s);
    case DType::kBFloat16:
      return launch_stats(static_cast<const __nv_bfloat16*>(x),
                          static_cast<const __nv_bfloat16*>(w), inv_nx, inv_nw, labels,
                          B, C, d, scale, splits, m, l, acc, s);
  }
  return Status::Error("margin_softmax_stats: unknown dtype code");
}

Status margin_softmax_grad_weight(const void* x, const void* w, const float* inv_nx,
                                  const float* inv_nw, const int64_t* labels,
                                  const float* lse,
                                  const float* row_coef, int64_t B, int64_t C, int64_t d,
                                  DType dtype, float scale, float* out, void* stream) {
  if (B <= 0 || C <= 0 || d <= 0)
    return Status::Error("margin_softmax_grad_weight: sizes must be positive");
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad_weight(static_cast<const float*>(x), static_cast<const float*>(w),
                                inv_nx, inv_nw, labels, lse, row_coef, B, C, d,
                                scale, out, s);
    case DType::kFloat16:
      return launch_grad_weight(static_cast<const __half*>(x), static_cast<const __half*>(w),
                                inv_nx, inv_nw, labels, lse, row_coef, B, C, d,
                                scale, out, s);
    case DType::kBFloat16:
      return launch_grad_weight(static_cast<const __nv_bfloat16*>(x),
                                static_cast<const __nv_bfloat16*>(w), inv_nx, inv_nw, labels,
                                lse, row_coef, B, C, d, scale, out, s);
  }
  return Status::Error("margin_softmax_grad_weight: unknown dtype code");
}

}  // namespace bct_fast
