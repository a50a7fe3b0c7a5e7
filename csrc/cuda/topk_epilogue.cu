// Launcher of the top-k epilogue provider (contract: topk_epilogue.h; kernel:
// topk_epilogue_kernels.cuh). The GEMM that wrote the score block is the caller's (torch.mm).
#include "bct_fast/topk_epilogue.h"
#include "launch_common.cuh"
#include "topk_epilogue_kernels.cuh"

namespace bct_fast {
namespace {

template <int KCAP>
Status launch(const float* scores, int64_t rows, int64_t cols, const float* inv_nq,
              const float* inv_ng, int k, int64_t n0, bool exclude, int64_t self_col0,
              float* run_s, int64_t* run_i, int* nonfinite, cudaStream_t stream) {
  auto kernel = topk_select_kernel<KCAP>;
  const int smem = static_cast<int>(sizeof(tke::Smem<KCAP>));
  if (smem > tile::max_dynamic_smem(0))
    return Status::Error("topk_epilogue_select: k=" + std::to_string(k) + " needs " +
                         std::to_string(smem) + " bytes of shared memory per block, more than "
                         "this device allows");
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kernel<<<static_cast<unsigned>(rows), tke::kThreads, smem, stream>>>(
      scores, cols, inv_nq, inv_ng, k, n0, exclude, self_col0, run_s, run_i, nonfinite);
  return tile::check_launch("topk_epilogue_select");
}

}  // namespace

Status topk_epilogue_select(const float* scores, int64_t rows, int64_t cols, const float* inv_nq,
                            const float* inv_ng, int k, int64_t n0, bool exclude,
                            int64_t self_col0, float* run_s, int64_t* run_i, int* nonfinite,
                            void* stream) {
  if (rows < 1 || cols < 1) return Status::Error("topk_epilogue_select: sizes must be positive");
  // One block per row (gridDim.x); composites hold k + column in 32 bits.
  if (rows > 0x7fffffffLL || cols > 0x7fffffffLL)
    return Status::Error("topk_epilogue_select: rows and cols must be below 2^31");
  if (k < 1 || k > kTopkEpilogueMaxK)
    return Status::Error("topk_epilogue_select: k must be in [1, " +
                         std::to_string(kTopkEpilogueMaxK) + "], got " + std::to_string(k));
  if (n0 < 0) return Status::Error("topk_epilogue_select: n0 must be >= 0");
  auto s = static_cast<cudaStream_t>(stream);
#define BCT_TKE_CASE(KCAP)                                                                     \
  if (k <= KCAP)                                                                               \
    return launch<KCAP>(scores, rows, cols, inv_nq, inv_ng, k, n0, exclude, self_col0, run_s, \
                        run_i, nonfinite, s);
  BCT_TKE_CASE(64)
  BCT_TKE_CASE(256)
  BCT_TKE_CASE(1024)
  BCT_TKE_CASE(2048)
  BCT_TKE_CASE(4096)
#undef BCT_TKE_CASE
  return Status::Error("topk_epilogue_select: unreachable k");
}

}  // namespace bct_fast
