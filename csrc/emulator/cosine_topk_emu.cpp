// csrc/cuda/cosine_topk.cu compiled for the CPU emulator (see margin_softmax_emu.cpp).
#include "cosine_topk.cu.inc"

namespace bct_fast {
namespace {  // the .cu's anonymous namespace

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float"; }
template <>
const char* type_name<__half>() { return "__half"; }
template <>
const char* type_name<__nv_bfloat16>() { return "__nv_bfloat16"; }

// Every (KCAP, QT) of dispatch_k; all smem is dynamic (sizeof(Smem<KCAP, QT>)).
template <typename TQ, typename TG>
void register_for() {
  const std::string types = std::string(type_name<TQ>()) + ", " + type_name<TG>();
#define BCT_EMU_REGISTER(KCAP, QT)                                                     \
  bct_emu::register_kernel(reinterpret_cast<const void*>(&topk_kernel<TQ, TG, KCAP, QT>), \
                           "topk_kernel<" + types + ", " #KCAP ", " #QT ">", 0);
  BCT_EMU_REGISTER(64, 32)
  BCT_EMU_REGISTER(128, 32)
  BCT_EMU_REGISTER(256, 32)
  BCT_EMU_REGISTER(512, 16)
  BCT_EMU_REGISTER(1024, 8)
  BCT_EMU_REGISTER(2048, 4)
  BCT_EMU_REGISTER(4096, 2)
#undef BCT_EMU_REGISTER
}

}  // namespace
}  // namespace bct_fast

void bct_emu_register_cosine_topk() {
  bct_fast::register_for<float, float>();
  bct_fast::register_for<__half, __half>();
  bct_fast::register_for<__nv_bfloat16, __nv_bfloat16>();
  bct_fast::register_for<float, __half>();
  bct_fast::register_for<float, __nv_bfloat16>();
}
