// csrc/cuda/margin_fused.cu (launchers and, through margin_fused_kernels.cuh and mma_common.cuh,
// kernels) compiled for the CPU emulator (see margin_softmax_emu.cpp for how the .cu copy is made).
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
}
