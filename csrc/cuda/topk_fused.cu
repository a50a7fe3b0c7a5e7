// Launchers of the fused tensor-core top-k cosine search (contract: topk_fused.h; kernels:
// topk_fused_kernels.cuh).
#include <cstdint>
#include <string>

#include "bct_fast/topk_fused.h"
#include "launch_common.cuh"
#include "topk_fused_kernels.cuh"

namespace bct_fast {
namespace {

using tile::check_launch;

static_assert(tkf::kMaxK == kTopkFusedMaxK, "kernel and contract disagree on the largest k");

using tile::aligned16;

struct Args {
  const uint16_t* q;
  const uint16_t* g;
  int Q, N, d;
  const float* inv_nq;
  const float* inv_ng;
  int k;
  bool exclude;
  int64_t self_col0;
  int tiles_per_split;
  unsigned splits;
  const float* run_s;
  const int64_t* run_i;
  uint64_t* ws;
  int* nonfinite;
};

template <int KMAX, bool kAsync>
Status launch_partial(const Args& a, cudaStream_t stream) {
  constexpr int smem = tkf::Config<KMAX>::kSmemBytes;
  if (smem > tile::max_dynamic_smem(0))
    return Status::Error("topk_fused_search: needs " + std::to_string(smem) +
                         " bytes of shared memory per block, more than this device allows");
  if (cudaFuncSetAttribute(topk_fused_partial_kernel<KMAX, kAsync>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return check_launch("topk_fused_search (shared-memory opt-in)");
  const dim3 grid(static_cast<unsigned>((a.Q + tkf::kBM - 1) / tkf::kBM), a.splits);
  topk_fused_partial_kernel<KMAX, kAsync><<<grid, tkf::kThreads, smem, stream>>>(
      a.q, a.g, a.Q, a.N, a.d, a.inv_nq, a.inv_ng, a.k, a.exclude, a.self_col0,
      a.tiles_per_split, a.run_s, a.run_i, a.ws, a.nonfinite);
  return check_launch("topk_fused_search");
}

template <int KMAX>
Status launch_partial(const Args& a, bool async, cudaStream_t stream) {
  return async ? launch_partial<KMAX, true>(a, stream) : launch_partial<KMAX, false>(a, stream);
}

}  // namespace

int64_t topk_fused_default_splits(int64_t Q, int64_t N) {
  if (Q < 1 || N < 1) return 1;
  // ~2 waves of an H100 (132 SMs) at one block per SM; a split gets at least 4 column tiles.
  const int64_t s =
      tile::shape_splits((Q + tkf::kBM - 1) / tkf::kBM, (N + tkf::kBN - 1) / tkf::kBN, 264, 4);
  return s > 65535 ? 65535 : s;
}

int64_t topk_fused_workspace_bytes(int64_t Q, int64_t splits, int k) {
  if (Q < 1 || splits < 1 || k < 1) return 0;
  return splits * Q * k * static_cast<int64_t>(sizeof(uint64_t));  // one partial list per split
}

Status topk_fused_search(const void* q, const void* g, DType dtype, int64_t Q, int64_t N, int64_t d,
                         const float* inv_nq, const float* inv_ng, int k, int64_t n0, bool exclude,
                         int64_t self_col0, int64_t splits, void* workspace,
                         int64_t workspace_bytes, float* run_s, int64_t* run_i, int* nonfinite,
                         void* stream) {
  const char* what = "topk_fused_search";
  if (dtype != DType::kBFloat16) return Status::Error("topk_fused_search: q and g must be bfloat16");
  if (Q < 1 || N < 1 || d < 1)
    return Status::Error("topk_fused_search: Q, N and d must be positive");
  // The kernel indexes rows, columns and depth with int (global offsets in int64).
  if (Q > INT32_MAX - tkf::kBM || N > INT32_MAX - tkf::kBN || d > INT32_MAX - tkf::kBK)
    return Status::Error("topk_fused_search: Q, N and d must be below 2^31 - 128");
  if (k < 1 || k > kTopkFusedMaxK)
    return Status::Error("topk_fused_search: k must be in [1, " + std::to_string(kTopkFusedMaxK) +
                         "], got " + std::to_string(k));
  if (n0 < 0) return Status::Error("topk_fused_search: n0 must be >= 0");
  if (splits < 1) return Status::Error("topk_fused_search: splits must be >= 1");
  if (q == nullptr) return Status::Error("topk_fused_search: q is a null pointer");
  if (g == nullptr) return Status::Error("topk_fused_search: g is a null pointer");
  if (workspace == nullptr) return Status::Error("topk_fused_search: workspace is a null pointer");
  if (run_s == nullptr) return Status::Error("topk_fused_search: run_s is a null pointer");
  if (run_i == nullptr) return Status::Error("topk_fused_search: run_i is a null pointer");
  if (nonfinite == nullptr) return Status::Error("topk_fused_search: nonfinite is a null pointer");
  if (reinterpret_cast<uintptr_t>(workspace) % 8 != 0)  // read and written as uint64
    return Status::Error("topk_fused_search: workspace must be 8-byte aligned");
  if (workspace_bytes < topk_fused_workspace_bytes(Q, splits, k))
    return Status::Error("topk_fused_search: workspace has " + std::to_string(workspace_bytes) +
                         " bytes, needs " + std::to_string(topk_fused_workspace_bytes(Q, splits, k)));
  Status st = tile::check_sm80(what);
  if (!st.ok()) return st;

  // Whole column tiles per split; the used splits fit the workspace sized for `splits`.
  const int64_t n_tiles = (N + tkf::kBN - 1) / tkf::kBN;
  const auto [tiles_per_split, used] = tile::whole_tile_splits(n_tiles, splits);
  if (used > 65535) return Status::Error("topk_fused_search: more than 65535 splits");
  if (tiles_per_split * ((d + tkf::kBK - 1) / tkf::kBK) > INT32_MAX)
    return Status::Error("topk_fused_search: too many columns x depth per split; use more splits");

  auto s = static_cast<cudaStream_t>(stream);
  const Args a{static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(g),
               static_cast<int>(Q), static_cast<int>(N), static_cast<int>(d), inv_nq, inv_ng, k,
               exclude, self_col0, static_cast<int>(tiles_per_split), static_cast<unsigned>(used),
               run_s, run_i, static_cast<uint64_t*>(workspace), nonfinite};
  const bool async = d % 8 == 0 && aligned16(q) && aligned16(g);
  st = k <= 32   ? launch_partial<32>(a, async, s)
       : k <= 64 ? launch_partial<64>(a, async, s)
                 : launch_partial<128>(a, async, s);
  if (!st.ok()) return st;
  topk_fused_merge_kernel<<<static_cast<unsigned>(Q), tkf::kMergeThreads, 0, s>>>(
      a.ws, Q, static_cast<int>(used), k, n0, run_s, run_i);
  return check_launch(what);
}

}  // namespace bct_fast
