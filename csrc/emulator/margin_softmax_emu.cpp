// csrc/cuda/margin_softmax.cu (launchers and, through margin_softmax_kernels.cuh, kernels)
// compiled for the CPU emulator. The build (tests/ops/kernel_emulator.py) includes a copy of the
// .cu in which each `kernel<<<grid, block, smem, stream>>>(args)` reads
// `::bct_emu::launcher(kernel, "kernel", grid, block, smem, stream)(args)`; nothing else changes.
#include "margin_softmax.cu.inc"

namespace bct_fast {
namespace {  // the .cu's anonymous namespace: its kernels are visible here

// Static smem as ptxas reports it for sm_90 (nvcc -Xptxas -v); stats_kernel<T, false> has no
// row_alpha (unused without the accumulator, so nvcc drops it).
template <typename T>
void register_for(const char* type) {
  const std::string t = type;
  bct_emu::register_kernel(reinterpret_cast<const void*>(&stats_kernel<T, false>),
                           "stats_kernel<" + t + ", false>", 12928);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&stats_kernel<T, true>),
                           "stats_kernel<" + t + ", true>", 13056);
  bct_emu::register_kernel(reinterpret_cast<const void*>(&grad_weight_kernel<T>),
                           "grad_weight_kernel<" + t + ">", 12672);
}

}  // namespace
}  // namespace bct_fast

void bct_emu_register_margin_softmax() {
  bct_fast::register_for<float>("float");
  bct_fast::register_for<__half>("__half");
  bct_fast::register_for<__nv_bfloat16>("__nv_bfloat16");
}
