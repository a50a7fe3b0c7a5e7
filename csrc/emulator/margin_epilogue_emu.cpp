// csrc/cuda/margin_epilogue.cu (launchers and, through margin_epilogue_kernels.cuh, kernels)
// compiled for the CPU emulator (see margin_softmax_emu.cpp for how the .cu copy is made).
#include "margin_epilogue.cu.inc"

namespace bct_fast {
namespace {  // the .cu's anonymous namespace: its kernels are visible here

// Static smem as ptxas reports it for sm_90 (nvcc -Xptxas -v): red_max + red_sum, 2 x 8 floats.
template <typename T>
void register_for(const char* type) {
  const std::string t = type;
  bct_emu::register_kernel(reinterpret_cast<const void*>(&stats_epilogue_kernel<T, true>),
                           "stats_epilogue_kernel<" + t + ", true>", 64);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&grads_epilogue_kernel<T>),
                           "grads_epilogue_kernel<" + t + ">", 0);
}

}  // namespace
}  // namespace bct_fast

void bct_emu_register_margin_epilogue() {
  bct_emu::register_kernel(
      reinterpret_cast<const void*>(&bct_fast::stats_epilogue_kernel<float, false>),
      "stats_epilogue_kernel<float, false>", 64);
  bct_fast::register_for<float>("float");
  bct_fast::register_for<__nv_bfloat16>("__nv_bfloat16");
}
