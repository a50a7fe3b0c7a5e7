// Linked right before and right after the kernel objects (compiled twice, with
// -DBCT_EMU_MARKER=bct_emu_smem_begin and =bct_emu_smem_end): the linker lays out .bss in
// link order, so the bytes between the two markers are the kernels' static (__shared__) arrays.
extern "C" {
alignas(64) char BCT_EMU_MARKER[64];
}
