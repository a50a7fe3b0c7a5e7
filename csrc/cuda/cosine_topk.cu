// Fused exact top-k cosine search. See cosine_topk.h for the contract.
//
// Block = (QT queries) x (one gallery split). For each tile of kNT gallery rows the block
// computes the QT x kNT scores into shared memory, then keeps per query a sorted list of the
// best KCAP candidates plus an append buffer of KCAP slots: a score enters the buffer only if
// it beats the query's current k-th best, and a full buffer is merged by a bitonic sort of the
// 2*KCAP entries. Order is (score desc, index asc) everywhere, so ties go to the lower index.
// Plain SIMT with fp32 accumulation (correctness first; tensor cores are issue 7's work).
#include <climits>

#include "bct_fast/cosine_topk.h"
#include "cosine_topk_kernels.cuh"
#include "launch_common.cuh"

namespace bct_fast {
namespace {

using tile::kThreads;

template <typename TQ, typename TG, int KCAP, int QT>
Status launch(const void* q, const void* g, const float* inv_nq, const float* inv_ng, int64_t Q,
              int64_t N, int64_t d, int k, int splits, bool exclude, int64_t exclude_offset, float* out_s,
              int64_t* out_i, int* nonfinite, cudaStream_t stream) {
  auto kernel = topk_kernel<TQ, TG, KCAP, QT>;
  const int smem = static_cast<int>(sizeof(Smem<KCAP, QT>));
  if (smem > tile::max_dynamic_smem(0))
    return Status::Error("cosine_topk: k=" + std::to_string(k) + " needs " + std::to_string(smem) +
                         " bytes of shared memory per block, more than this device allows");
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // Splits past the end of the gallery run no tiles and write empty lists (-inf, -1).
  const int64_t per_split = ((N + splits - 1) / splits + kNT - 1) / kNT * kNT;
  dim3 grid(static_cast<unsigned>((Q + QT - 1) / QT), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const TQ*>(q), static_cast<const TG*>(g),
                                           inv_nq, inv_ng, Q, N, d, k, per_split, exclude, exclude_offset,
                                           out_s, out_i, nonfinite);
  return tile::check_launch("cosine_topk");
}

// k -> (KCAP, QT): KCAP = smallest power of two >= max(k, kNT); QT shrinks as lists grow so one
// block's lists stay within ~130 KB of shared memory.
template <typename TQ, typename TG>
Status dispatch_k(const void* q, const void* g, const float* inv_nq, const float* inv_ng,
                  int64_t Q, int64_t N, int64_t d, int k, int splits, bool exclude,
                  int64_t exclude_offset, float* out_s, int64_t* out_i, int* nonfinite, cudaStream_t stream) {
#define BCT_TOPK_CASE(KCAP, QT)                                                                 \
  if (k <= KCAP)                                                                                \
    return launch<TQ, TG, KCAP, QT>(q, g, inv_nq, inv_ng, Q, N, d, k, splits, exclude, exclude_offset, \
                                    out_s, out_i, nonfinite, stream);
  BCT_TOPK_CASE(64, 32)
  BCT_TOPK_CASE(128, 32)
  BCT_TOPK_CASE(256, 32)
  BCT_TOPK_CASE(512, 16)
  BCT_TOPK_CASE(1024, 8)
  BCT_TOPK_CASE(2048, 4)
  BCT_TOPK_CASE(4096, 2)
#undef BCT_TOPK_CASE
  return Status::Error("cosine_topk: k=" + std::to_string(k) + " exceeds the kernel's maximum " +
                       std::to_string(kTopkMaxK));
}

}  // namespace

Status cosine_topk_partial(const void* q, const void* g, const float* inv_nq, const float* inv_ng,
                           int64_t Q, int64_t N, int64_t d, DType q_dtype, DType g_dtype, int k,
                           int splits, bool exclude, int64_t exclude_offset,
                           float* out_scores, int64_t* out_idx, int* nonfinite, void* stream) {
  if (Q < 1 || N < 1 || d < 1) return Status::Error("cosine_topk: empty input");
  if (k < 1 || k > kTopkMaxK || k > N) return Status::Error("cosine_topk: k out of range");
  if (N >= INT_MAX) return Status::Error("cosine_topk: gallery chunk must have < 2^31 rows");
  if (splits < 1) return Status::Error("cosine_topk: splits must be >= 1");
  auto s = static_cast<cudaStream_t>(stream);
#define BCT_TOPK_ARGS q, g, inv_nq, inv_ng, Q, N, d, k, splits, exclude, exclude_offset, out_scores, out_idx, nonfinite, s
  using F32 = float;
  using F16 = __half;
  using BF16 = __nv_bfloat16;
  if (q_dtype == g_dtype) {
    switch (q_dtype) {
      case DType::kFloat32: return dispatch_k<F32, F32>(BCT_TOPK_ARGS);
      case DType::kFloat16: return dispatch_k<F16, F16>(BCT_TOPK_ARGS);
      case DType::kBFloat16: return dispatch_k<BF16, BF16>(BCT_TOPK_ARGS);
    }
  } else if (q_dtype == DType::kFloat32) {
    switch (g_dtype) {
      case DType::kFloat16: return dispatch_k<F32, F16>(BCT_TOPK_ARGS);
      case DType::kBFloat16: return dispatch_k<F32, BF16>(BCT_TOPK_ARGS);
      default: break;
    }
  }
#undef BCT_TOPK_ARGS
  return Status::Error("cosine_topk: unsupported dtype combination");
}

}  // namespace bct_fast
