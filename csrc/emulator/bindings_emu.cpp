// The pieces that turn csrc/bindings.cpp, built against the emulated launchers, into an
// importable module (tests/ops/kernel_emulator.py: build_bindings): the kernels' registration,
// which the driver's main() does, and a runtime_info without a CUDA runtime to ask.
#include "bct_fast/runtime_info.h"
#include "emu_host.h"

namespace bct_fast {

RuntimeInfo query_runtime_info() {
  RuntimeInfo info;
  info.note = "the CPU emulator of the kernels (tests/ops/kernel_emulator.py), not a GPU";
  return info;
}

}  // namespace bct_fast

// Called once by the test harness (ctypes) after the import: explicit, so that it cannot run
// before the shim's own static objects are constructed.
extern "C" void bct_emu_register_all() { bct_emu::register_all_kernels(); }
