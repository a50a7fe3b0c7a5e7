// csrc/cuda/topk_fused.cu (launchers and, through topk_fused_kernels.cuh and mma_common.cuh,
// kernels) compiled for the CPU emulator (see margin_softmax_emu.cpp for how the .cu copy is made).
// mma.sync / ldmatrix / cp.async run as the emulations in mma_common.cuh.
#include "topk_fused.cu.inc"

namespace bct_fast {
namespace {  // the .cu's anonymous namespace: its kernels are visible here

// Static smem as ptxas reports it for sm_90 (nvcc -Xptxas -v): the partial kernel's stages and
// row state are dynamic (tkf::Config<KMAX>::kSmemBytes, opted in by the launcher); the merge
// kernel has 4608 bytes of static lists and flags.
template <int KMAX, bool kAsync>
void register_partial() {
  bct_emu::register_kernel(reinterpret_cast<const void*>(&topk_fused_partial_kernel<KMAX, kAsync>),
                           "topk_fused_partial_kernel<" + std::to_string(KMAX) + ", " +
                               (kAsync ? "true" : "false") + ">",
                           0);
}

}  // namespace
}  // namespace bct_fast

void bct_emu_register_topk_fused() {
  using namespace bct_fast;
  register_partial<32, true>();
  register_partial<32, false>();
  register_partial<64, true>();
  register_partial<64, false>();
  register_partial<128, true>();
  register_partial<128, false>();
  bct_emu::register_kernel(reinterpret_cast<const void*>(&topk_fused_merge_kernel),
                           "topk_fused_merge_kernel", 4608);
}
