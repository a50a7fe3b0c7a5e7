// csrc/cuda/topk_epilogue.cu (launcher and, through topk_epilogue_kernels.cuh, the selection
// kernel) compiled for the CPU emulator (see margin_softmax_emu.cpp for how the .cu copy is made).
#include "topk_epilogue.cu.inc"

namespace bct_fast {
namespace {  // the .cu's anonymous namespace: its kernels are visible here

// All shared memory is dynamic (sizeof(tke::Smem<KCAP>)); ptxas reports 0 bytes static.
template <int KCAP>
void register_kcap() {
  bct_emu::register_kernel(reinterpret_cast<const void*>(&topk_select_kernel<KCAP>),
                           "topk_select_kernel<" + std::to_string(KCAP) + ">", 0);
}

}  // namespace
}  // namespace bct_fast

void bct_emu_register_topk_epilogue() {
  bct_fast::register_kcap<64>();
  bct_fast::register_kcap<256>();
  bct_fast::register_kcap<1024>();
  bct_fast::register_kcap<2048>();
  bct_fast::register_kcap<4096>();
}
