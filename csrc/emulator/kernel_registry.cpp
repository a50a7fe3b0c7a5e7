// Registers every emulated kernel family with the shim (names, ptxas's static smem sizes): the
// driver's main() and the emulated binding module (bindings_emu.cpp) both start with this.
#include "emu_host.h"

void bct_emu_register_margin_softmax();
void bct_emu_register_margin_epilogue();
void bct_emu_register_cosine_topk();
void bct_emu_register_topk_epilogue();
void bct_emu_register_margin_fused();
void bct_emu_register_topk_fused();

namespace bct_emu {

void register_all_kernels() {
  bct_emu_register_margin_softmax();
  bct_emu_register_margin_epilogue();
  bct_emu_register_cosine_topk();
  bct_emu_register_topk_epilogue();
  bct_emu_register_margin_fused();
  bct_emu_register_topk_fused();
}

}  // namespace bct_emu
