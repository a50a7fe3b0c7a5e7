// One-warp kernels that run a single emulated tensor-core instruction of mma_common.cuh on
// register contents chosen by the caller, so the emulations can be compared with a source other
// than our reading of the PTX ISA: CUTLASS/CuTe's fragment layouts
// (tests/ops/test_fragment_layouts_cute.py). Run by `op fragment_probe` of the driver.
// Compiled like the real kernels (-fsanitize=thread hooks, between the smem markers).
#include <string>

#include "mma_common.cuh"

namespace {

namespace mma = bct_fast::mma;
using bct_fast::mma::ldmatrix_x4;
using bct_fast::mma::ldmatrix_x4_trans;
using bct_fast::mma::mma_m16n8k16_bf16;

// d[lane][i] = (a @ b + c) in the register layout the emulation gives: a[lane][0..3],
// b[lane][0..1] and c[lane][0..3] are each lane's registers, exactly as passed.
__global__ void mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const unsigned lane = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[4 * lane + i], acc[i] = c[4 * lane + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[2 * lane + i];
  mma_m16n8k16_bf16(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

// tile: 32 rows of 8 b16 (16 bytes each). Lane l copies row l to shared memory and gives its
// address to ldmatrix .x4 (lanes 8i..8i+7 name the rows of matrix i); r[lane][0..3] are the
// registers each lane receives.
template <bool kTrans>
__global__ void ldmatrix_probe(const uint32_t* tile, uint32_t* r) {
  __shared__ __align__(16) uint32_t rows[32][4];
  const unsigned lane = threadIdx.x;
  for (int i = 0; i < 4; ++i) rows[lane][i] = tile[4 * lane + i];
  __syncwarp();
  uint32_t out[4];
  if (kTrans) ldmatrix_x4_trans(out, rows[lane]);
  else ldmatrix_x4(out, rows[lane]);
  for (int i = 0; i < 4; ++i) r[4 * lane + i] = out[i];
}

// c[lane][0..7] = this lane's C fragments t0 (columns 0-7) and t1 (columns 8-15) of one m16
// block; a[lane][0..3] = c_to_a of them (the A fragment the pws kernel feeds to its PV mma).
__global__ void c_to_a_probe(const float* c, uint32_t* a) {
  const unsigned lane = threadIdx.x;
  float t0[4], t1[4];
  for (int i = 0; i < 4; ++i) t0[i] = c[8 * lane + i], t1[i] = c[8 * lane + 4 + i];
  uint32_t out[4];
  mma::c_to_a(out, t0, t1);
  for (int i = 0; i < 4; ++i) a[4 * lane + i] = out[i];
}

// The kernels' per-lane fragment addressing, kAddressingInts per lane: a_ld_row, a_ld_col,
// b_ld_row, b_ld_col, bt_ld_row, bt_ld_col, then acc_row(lane, i), acc_col(lane, i) for i < 4.
constexpr int kAddressingInts = 14;
__global__ void addressing_probe(int* out) {
  const int lane = static_cast<int>(threadIdx.x);
  int* o = out + kAddressingInts * lane;
  o[0] = mma::a_ld_row(lane), o[1] = mma::a_ld_col(lane);
  o[2] = mma::b_ld_row(lane), o[3] = mma::b_ld_col(lane);
  o[4] = mma::bt_ld_row(lane), o[5] = mma::bt_ld_col(lane);
  for (int i = 0; i < 4; ++i) o[6 + 2 * i] = mma::acc_row(lane, i), o[7 + 2 * i] = mma::acc_col(lane, i);
}

template <typename K>
void reg(K* kernel, const char* name, size_t static_smem) {
  bct_emu::register_kernel(reinterpret_cast<const void*>(kernel), name, static_smem);
}

}  // namespace

// Runs the named probe (mma | ldmatrix | ldmatrix_trans | c_to_a | addressing) on one warp;
// in0..in2 are its inputs in the order of the kernel's parameters. Returns the launch's cudaError_t (0 = launched).
int bct_emu_fragment_probe(const std::string& name, const void* in0, const void* in1,
                           const void* in2, void* out) {
  reg(mma_probe, "mma_probe", 0);
  reg(ldmatrix_probe<false>, "ldmatrix_probe<false>", 512);
  reg(ldmatrix_probe<true>, "ldmatrix_probe<true>", 512);
  reg(c_to_a_probe, "c_to_a_probe", 0);
  reg(addressing_probe, "addressing_probe", 0);
  const dim3 grid(1), block(32);
  auto u32 = [](const void* p) { return static_cast<const uint32_t*>(p); };
  if (name == "mma") {
    bct_emu::launcher(mma_probe, "mma_probe", grid, block)(
        u32(in0), u32(in1), static_cast<const float*>(in2), static_cast<float*>(out));
  } else if (name == "ldmatrix") {
    bct_emu::launcher(ldmatrix_probe<false>, "ldmatrix_probe<false>", grid, block)(
        u32(in0), static_cast<uint32_t*>(out));
  } else if (name == "ldmatrix_trans") {
    bct_emu::launcher(ldmatrix_probe<true>, "ldmatrix_probe<true>", grid, block)(
        u32(in0), static_cast<uint32_t*>(out));
  } else if (name == "c_to_a") {
    bct_emu::launcher(c_to_a_probe, "c_to_a_probe", grid, block)(
        static_cast<const float*>(in0), static_cast<uint32_t*>(out));
  } else if (name == "addressing") {
    bct_emu::launcher(addressing_probe, "addressing_probe", grid, block)(static_cast<int*>(out));
  } else {
    bct_emu::fail("unknown fragment probe '%s'", name.c_str());
  }
  return cudaGetLastError();
}
