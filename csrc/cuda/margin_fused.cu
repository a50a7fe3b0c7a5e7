// Launchers of the fused tensor-core forward (contract: margin_fused.h; kernels:
// margin_fused_kernels.cuh, and margin_fused_pws_kernels.cuh for lse + pws).
#include <cstdint>
#include <string>

#include "bct_fast/margin_fused.h"
#include "launch_common.cuh"
#include "margin_fused_kernels.cuh"
#include "margin_fused_pws_kernels.cuh"

namespace bct_fast {
namespace {

using tile::check_launch;

using tile::aligned16;

template <bool kAsync>
Status launch_partial(const uint16_t* x, const uint16_t* w, int B, int C, int d,
                      const float* inv_nx, const float* inv_nw, const int64_t* labels,
                      float scale, int64_t splits,
                      int tiles_per_split, float* ws_m, float* ws_l, cudaStream_t stream) {
  // grid.y = splits (the ones that have classes), each of tiles_per_split class tiles.
  constexpr int smem = fused::kSmemBytes;
  if (smem > tile::max_dynamic_smem(0))
    return Status::Error("margin_fused_lse: needs " + std::to_string(smem) +
                         " bytes of shared memory per block, more than this device allows");
  if (cudaFuncSetAttribute(fused_lse_partial_kernel<kAsync>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return check_launch("margin_fused_lse (shared-memory opt-in)");
  const dim3 grid(static_cast<unsigned>((B + fused::kBM - 1) / fused::kBM),
                  static_cast<unsigned>(splits));
  fused_lse_partial_kernel<kAsync><<<grid, fused::kThreads, smem, stream>>>(
      x, w, B, C, d, inv_nx, inv_nw, labels, scale, tiles_per_split, ws_m, ws_l);
  return check_launch("margin_fused_lse");
}

template <int kDP, bool kAsync>
Status launch_pws_partial(const uint16_t* x, const uint16_t* w, int B, int C, int d,
                          const float* inv_nx, const float* inv_nw, const int64_t* labels,
                          float scale, int64_t splits,
                          int tiles_per_split, float* ws_m, float* ws_l, float* ws_o,
                          cudaStream_t stream) {
  constexpr int smem = fpws::Shape<kDP>::kSmemBytes;
  if (smem > tile::max_dynamic_smem(0))
    return Status::Error("margin_fused_lse_pws: needs " + std::to_string(smem) +
                         " bytes of shared memory per block, more than this device allows");
  if (cudaFuncSetAttribute(fused_pws_partial_kernel<kDP, kAsync>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return check_launch("margin_fused_lse_pws (shared-memory opt-in)");
  const dim3 grid(static_cast<unsigned>((B + fpws::kBM - 1) / fpws::kBM),
                  static_cast<unsigned>(splits));
  fused_pws_partial_kernel<kDP, kAsync><<<grid, fpws::kThreads, smem, stream>>>(
      x, w, B, C, d, inv_nx, inv_nw, labels, scale, tiles_per_split, ws_m, ws_l,
      ws_o);
  return check_launch("margin_fused_lse_pws");
}

template <bool kAsync>
Status launch_pws_partial_d(const uint16_t* x, const uint16_t* w, int B, int C, int d,
                            const float* inv_nx, const float* inv_nw, const int64_t* labels,
                            float scale, int64_t splits,
                            int tiles_per_split, float* ws_m, float* ws_l, float* ws_o,
                            cudaStream_t stream) {
  // d padded to the next of 64 / 128 / 256 / 512 (zero-filled depth).
  if (d <= 64)
    return launch_pws_partial<64, kAsync>(x, w, B, C, d, inv_nx, inv_nw, labels, scale, splits,
                                          tiles_per_split, ws_m, ws_l, ws_o, stream);
  if (d <= 128)
    return launch_pws_partial<128, kAsync>(x, w, B, C, d, inv_nx, inv_nw, labels, scale, splits,
                                           tiles_per_split, ws_m, ws_l, ws_o, stream);
  if (d <= 256)
    return launch_pws_partial<256, kAsync>(x, w, B, C, d, inv_nx, inv_nw, labels, scale, splits,
                                           tiles_per_split, ws_m, ws_l, ws_o, stream);
  return launch_pws_partial<512, kAsync>(x, w, B, C, d, inv_nx, inv_nw, labels, scale, splits,
                                         tiles_per_split, ws_m, ws_l, ws_o, stream);
}

}  // namespace

int64_t margin_fused_default_splits(int64_t B, int64_t C) {
  if (B < 1 || C < 1) return 1;
  return tile::shape_splits((B + fused::kBM - 1) / fused::kBM, (C + fused::kBN - 1) / fused::kBN,
                            512, 4);
}

Status margin_fused_lse(const void* x, const void* w, DType dtype, int64_t B, int64_t C, int64_t d,
                        const float* inv_nx, const float* inv_nw, const int64_t* labels,
                        float scale, int64_t splits, float* workspace,
                        int64_t workspace_floats, double* lse, void* stream) {
  const char* what = "margin_fused_lse";
  if (dtype != DType::kBFloat16) return Status::Error("margin_fused_lse: x and w must be bfloat16");
  if (B < 1 || C < 1 || d < 1) return Status::Error("margin_fused_lse: B, C and d must be positive");
  // The kernel indexes rows, classes and depth with int (global offsets in int64).
  if (B > INT32_MAX - fused::kBM || C > INT32_MAX - fused::kBN || d > INT32_MAX - fused::kBK)
    return Status::Error("margin_fused_lse: B, C and d must be below 2^31 - 128");
  if (splits < 1) return Status::Error("margin_fused_lse: splits must be >= 1");
  if (x == nullptr || w == nullptr || inv_nx == nullptr || inv_nw == nullptr ||
      labels == nullptr || workspace == nullptr || lse == nullptr)
    return Status::Error("margin_fused_lse: null pointer argument");
  if (workspace_floats < margin_fused_workspace_floats(B, splits))
    return Status::Error("margin_fused_lse: workspace has " + std::to_string(workspace_floats) +
                         " floats, needs " + std::to_string(margin_fused_workspace_floats(B, splits)));
  Status st = tile::check_sm80(what);
  if (!st.ok()) return st;

  const int64_t n_tiles = (C + fused::kBN - 1) / fused::kBN;
  const auto [tiles_per_split, used] = tile::whole_tile_splits(n_tiles, splits);
  if (used > 65535) return Status::Error("margin_fused_lse: more than 65535 class splits");
  // A block's iterations (class tiles x depth slices) are counted in int.
  if (tiles_per_split * ((d + fused::kBK - 1) / fused::kBK) > INT32_MAX)
    return Status::Error("margin_fused_lse: too many classes x depth per split; use more splits");
  float* ws_m = workspace;
  float* ws_l = workspace + used * B;  // the merge kernel reads `used` rows of each

  auto s = static_cast<cudaStream_t>(stream);
  auto xb = static_cast<const uint16_t*>(x);
  auto wb = static_cast<const uint16_t*>(w);
  const int Bi = static_cast<int>(B), Ci = static_cast<int>(C), di = static_cast<int>(d);
  const int tps = static_cast<int>(tiles_per_split);
  st = d % 8 == 0 && aligned16(x) && aligned16(w)
           ? launch_partial<true>(xb, wb, Bi, Ci, di, inv_nx, inv_nw, labels, scale,
                                  used, tps, ws_m, ws_l, s)
           : launch_partial<false>(xb, wb, Bi, Ci, di, inv_nx, inv_nw, labels, scale,
                                   used, tps, ws_m, ws_l, s);
  if (!st.ok()) return st;
  const unsigned blocks = static_cast<unsigned>((B + fused::kMergeThreads - 1) / fused::kMergeThreads);
  fused_lse_merge_kernel<<<blocks, fused::kMergeThreads, 0, s>>>(ws_m, ws_l, B,
                                                                 static_cast<int>(used), lse);
  return check_launch(what);
}

Status margin_fused_mma_tile_check(const void* a, const void* b, const float* c, float* d,
                                   void* stream) {
  const char* what = "margin_fused_mma_tile_check";
  if (a == nullptr || b == nullptr || c == nullptr || d == nullptr)
    return Status::Error("margin_fused_mma_tile_check: null pointer argument");
  if (!aligned16(a) || !aligned16(b))
    return Status::Error("margin_fused_mma_tile_check: a and b must be 16-byte aligned");
  Status st = tile::check_sm80(what);
  if (!st.ok()) return st;
  mma_tile_check_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), c, d);
  return check_launch(what);
}

int64_t margin_fused_pws_default_splits(int64_t B, int64_t C) {
  if (B < 1 || C < 1) return 1;
  return tile::shape_splits((B + fpws::kBM - 1) / fpws::kBM, (C + fpws::kBN - 1) / fpws::kBN,
                            256, 4);
}

Status margin_fused_lse_pws(const void* x, const void* w, DType dtype, int64_t B, int64_t C,
                            int64_t d, const float* inv_nx, const float* inv_nw,
                            const int64_t* labels, float scale,
                            int64_t splits, float* workspace, int64_t workspace_floats, double* lse,
                            float* pws, void* stream) {
  const char* what = "margin_fused_lse_pws";
  if (dtype != DType::kBFloat16)
    return Status::Error("margin_fused_lse_pws: x and w must be bfloat16");
  if (B < 1 || C < 1 || d < 1)
    return Status::Error("margin_fused_lse_pws: B, C and d must be positive");
  if (d > kMarginFusedPwsMaxD)
    return Status::Error("margin_fused_lse_pws: d = " + std::to_string(d) + " is above " +
                         std::to_string(kMarginFusedPwsMaxD) +
                         " (O does not fit the registers; use the epilogue provider)");
  if (B > INT32_MAX - fpws::kBM || C > INT32_MAX - fpws::kBN)
    return Status::Error("margin_fused_lse_pws: B and C must be below 2^31 - 64");
  if (splits < 1) return Status::Error("margin_fused_lse_pws: splits must be >= 1");
  if (x == nullptr || w == nullptr || inv_nx == nullptr || inv_nw == nullptr ||
      labels == nullptr || workspace == nullptr || lse == nullptr ||
      pws == nullptr)
    return Status::Error("margin_fused_lse_pws: null pointer argument");
  const int64_t need = margin_fused_pws_workspace_floats(B, d, splits);
  if (workspace_floats < need)
    return Status::Error("margin_fused_lse_pws: workspace has " + std::to_string(workspace_floats) +
                         " floats, needs " + std::to_string(need));
  Status st = tile::check_sm80(what);
  if (!st.ok()) return st;

  const int64_t n_tiles = (C + fpws::kBN - 1) / fpws::kBN;
  const auto [tiles_per_split, used] = tile::whole_tile_splits(n_tiles, splits);
  if (used > 65535) return Status::Error("margin_fused_lse_pws: more than 65535 class splits");
  float* ws_m = workspace;
  float* ws_l = workspace + used * B;
  float* ws_o = workspace + 2 * used * B;  // used x B x d

  auto s = static_cast<cudaStream_t>(stream);
  auto xb = static_cast<const uint16_t*>(x);
  auto wb = static_cast<const uint16_t*>(w);
  const int Bi = static_cast<int>(B), Ci = static_cast<int>(C), di = static_cast<int>(d);
  const int tps = static_cast<int>(tiles_per_split);
  st = d % 8 == 0 && aligned16(x) && aligned16(w)
           ? launch_pws_partial_d<true>(xb, wb, Bi, Ci, di, inv_nx, inv_nw, labels, scale, used,
                                        tps, ws_m, ws_l, ws_o, s)
           : launch_pws_partial_d<false>(xb, wb, Bi, Ci, di, inv_nx, inv_nw, labels, scale, used,
                                         tps, ws_m, ws_l, ws_o, s);
  if (!st.ok()) return st;
  fused_pws_merge_kernel<<<static_cast<unsigned>(B), fpws::kMergeThreads, 0, s>>>(
      ws_m, ws_l, ws_o, B, di, static_cast<int>(used), lse, pws);
  return check_launch(what);
}

Status margin_fused_pv_tile_check(const void* p, const void* w, const float* c, float* d,
                                  void* stream) {
  const char* what = "margin_fused_pv_tile_check";
  if (p == nullptr || w == nullptr || c == nullptr || d == nullptr)
    return Status::Error("margin_fused_pv_tile_check: null pointer argument");
  if (!aligned16(w)) return Status::Error("margin_fused_pv_tile_check: w must be 16-byte aligned");
  Status st = tile::check_sm80(what);
  if (!st.ok()) return st;
  pv_tile_check_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint16_t*>(p), static_cast<const uint16_t*>(w), c, d);
  return check_launch(what);
}

}  // namespace bct_fast
