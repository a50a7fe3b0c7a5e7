// Launchers of the margin-softmax epilogue provider (contract: margin_epilogue.h; kernels:
// margin_epilogue_kernels.cuh). The GEMMs are the caller's (cuBLAS via torch.mm).
#include "bct_fast/margin_epilogue.h"
#include "launch_common.cuh"
#include "margin_epilogue_kernels.cuh"

namespace bct_fast {
namespace {

using tile::check_launch;

// One block per row: gridDim.x is limited to 2^31 - 1.
Status check_sizes(const char* what, int64_t B, int64_t cols) {
  if (B <= 0 || cols <= 0) return Status::Error(std::string(what) + ": sizes must be positive");
  if (B > 0x7fffffffLL) return Status::Error(std::string(what) + ": more than 2^31 - 1 rows");
  return Status::Ok();
}

template <typename TE, bool kWriteE>
Status launch_stats(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                    const float* inv_nw, const int64_t* labels, int64_t c0, float scale, float* m,
                    float* l, TE* e_out, float* alpha_out,
                    cudaStream_t stream) {
  stats_epilogue_kernel<TE, kWriteE><<<static_cast<unsigned>(B), epi::kThreads, 0, stream>>>(
      scores, cols, inv_nx, inv_nw, labels, c0, scale, m, l, e_out, alpha_out);
  return check_launch("margin_epilogue_stats");
}

template <typename TP>
Status launch_grads(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                    const float* inv_nw, const int64_t* labels, int64_t c0, float scale,
                    const float* lse, const float* row_coef, TP* p_out,
                    TP* pw_out, cudaStream_t stream) {
  grads_epilogue_kernel<TP><<<static_cast<unsigned>(B), epi::kThreads, 0, stream>>>(
      scores, cols, inv_nx, inv_nw, labels, c0, scale, lse, row_coef, p_out, pw_out);
  return check_launch("margin_epilogue_grads");
}

}  // namespace

Status margin_epilogue_stats(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                             const float* inv_nw, const int64_t* labels,
                             int64_t c0, float scale, float* m,
                             float* l, void* e_out, DType e_dtype, float* alpha_out,
                             void* stream) {
  Status st = check_sizes("margin_epilogue_stats", B, cols);
  if (!st.ok()) return st;
  if ((e_out == nullptr) != (alpha_out == nullptr))
    return Status::Error("margin_epilogue_stats: e_out and alpha_out go together");
  auto s = static_cast<cudaStream_t>(stream);
  if (e_out == nullptr)
    return launch_stats<float, false>(scores, B, cols, inv_nx, inv_nw, labels, c0,
                                      scale, m, l, nullptr, nullptr, s);
  switch (e_dtype) {
    case DType::kFloat32:
      return launch_stats<float, true>(scores, B, cols, inv_nx, inv_nw, labels, c0,
                                       scale, m, l, static_cast<float*>(e_out), alpha_out, s);
    case DType::kBFloat16:
      return launch_stats<__nv_bfloat16, true>(scores, B, cols, inv_nx, inv_nw, labels,
                                               c0, scale, m, l,
                                               static_cast<__nv_bfloat16*>(e_out), alpha_out, s);
    default:
      break;
  }
  return Status::Error("margin_epilogue_stats: e_dtype must be float32 or bfloat16");
}

Status margin_epilogue_grads(const float* scores, int64_t B, int64_t cols, const float* inv_nx,
                             const float* inv_nw, const int64_t* labels,
                             int64_t c0, float scale,
                             const float* lse, const float* row_coef, void* p_out, void* pw_out,
                             DType out_dtype, void* stream) {
  Status st = check_sizes("margin_epilogue_grads", B, cols);
  if (!st.ok()) return st;
  if (p_out == nullptr && pw_out == nullptr)
    return Status::Error("margin_epilogue_grads: neither p_out nor pw_out given");
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_grads(scores, B, cols, inv_nx, inv_nw, labels, c0, scale, lse,
                          row_coef, static_cast<float*>(p_out), static_cast<float*>(pw_out), s);
    case DType::kBFloat16:
      return launch_grads(scores, B, cols, inv_nx, inv_nw, labels, c0, scale, lse,
                          row_coef, static_cast<__nv_bfloat16*>(p_out),
                          static_cast<__nv_bfloat16*>(pw_out), s);
    default:
      break;
  }
  return Status::Error("margin_epilogue_grads: out_dtype must be float32 or bfloat16");
}

}  // namespace bct_fast
