// csrc/cuda/margin_fused.cu (launchers and, through margin_fused_kernels.cuh,
// margin_fused_pws_kernels.cuh and mma_common.cuh, kernels) compiled for the CPU emulator (see margin_softmax_emu.cpp for how the .cu copy is made).
// mma.sync / ldmatrix / cp.async run as the emulations in mma_common.cuh.
#include "margin_fused.cu.inc"

void bct_emu_register_margin_fused() {
  using namespace bct_fast;
  // Static smem as ptxas reports it for sm_90 (nvcc -Xptxas -v): the fused kernel's stages are
  // dynamic (fused::kSmemBytes, opted in by the launcher); the tile check has two 16 x 40 bf16
  // tiles.
  bct_emu::register_kernel(reinterpret_cast<const void*>(&fused_lse_partial_kernel<true>),
                           "fused_lse_partial_kernel<true>", 0);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&fused_lse_partial_kernel<false>),
                           "fused_lse_partial_kernel<false>", 0);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&fused_lse_merge_kernel),
                           "fused_lse_merge_kernel", 0);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&mma_tile_check_kernel),
                           "mma_tile_check_kernel", 2560);
  // lse + pws (margin_fused_pws_kernels.cuh): all dynamic smem; the PV tile check has one
  // 16 x 24 bf16 tile.
#define BCT_EMU_REG_PWS(DP, ASYNC)                                                              \
  bct_emu::register_kernel(reinterpret_cast<const void*>(&fused_pws_partial_kernel<DP, ASYNC>), \
                           "fused_pws_partial_kernel<" #DP ", " #ASYNC ">", 0)
  BCT_EMU_REG_PWS(64, true);
  BCT_EMU_REG_PWS(128, true);
  BCT_EMU_REG_PWS(256, true);
  BCT_EMU_REG_PWS(512, true);
  BCT_EMU_REG_PWS(64, false);
  BCT_EMU_REG_PWS(128, false);
  BCT_EMU_REG_PWS(256, false);
  BCT_EMU_REG_PWS(512, false);
#undef BCT_EMU_REG_PWS
  bct_emu::register_kernel(reinterpret_cast<const void*>(&fused_pws_merge_kernel),
                           "fused_pws_merge_kernel", 0);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&pv_tile_check_kernel),
                           "pv_tile_check_kernel", 768);
}
