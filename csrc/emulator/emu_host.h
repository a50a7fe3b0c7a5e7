// Host-side API of the CPU emulator runtime (cuda_shim.cpp) for the driver.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bct_emu {

// Prints "bct_emu error: ..." to stderr and ends the process with exit status 3.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Seeds the order in which threads start and leave barriers (mixed with the block index).
void set_seed(uint64_t seed);

// A buffer of `bytes` whose last byte is followed by a PROT_NONE page (and preceded, one page
// further down, by another): reading or writing past its end faults at once.
void* guarded_alloc(size_t bytes);
void guarded_make_readonly(void* buf, size_t bytes);

// Registers the kernels of every family (kernel_registry.cpp); call once before any launch.
void register_all_kernels();

}  // namespace bct_emu
