// Prints, as JSON, CUTLASS/CuTe's (thread, value) layouts of the tensor-core instructions the
// fused kernels use, evaluated on the host from CuTe's own traits (not transcribed by us):
//   mma   MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>: A -> column-major (m, k) of 16 x 16,
//         B -> (n, k) of 8 x 16, C -> (m, n) of 16 x 8; value v of a bf16 operand is half v % 2
//         of register v / 2.
//   ldsm_n / ldsm_t   Copy_Traits<SM75_U32x4_LDSM_N> / <SM75_U16x8_LDSM_T>: (thread, bit) ->
//         bit of the 32 x 128-bit source, for the source (the row address each thread gives)
//         and the destination (the registers each thread receives, bit v in register v / 32).
// tests/ops/cute_layouts.py compiles this with nvcc (host code only) against the headers of the
// nvidia-cutlass wheel; CUTLASS's kernels run these layouts on hardware, so they are a second
// reading of the PTX ISA that does not share our mistakes.
#include <cstdio>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

namespace {

template <class L>
void print_table(const char* name, L layout, bool last = false) {
  using namespace cute;
  std::printf("  \"%s\": [", name);
  for (int t = 0; t < int(size<0>(layout)); ++t) {
    std::printf("%s[", t ? ", " : "");
    for (int v = 0; v < int(size<1>(layout)); ++v)
      std::printf("%s%d", v ? ", " : "", int(layout(t, v)));
    std::printf("]");
  }
  std::printf("]%s\n", last ? "" : ",");
}

template <class L>
void print_identity_check(const char* name, L layout) {
  using namespace cute;
  bool ok = true;
  for (int t = 0; t < int(size(layout)); ++t) ok = ok && int(layout(t)) == t;
  std::printf("  \"%s\": %s,\n", name, ok ? "true" : "false");
}

}  // namespace

int main() {
  using namespace cute;
  using Mma = MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>;
  using LdsmN = Copy_Traits<SM75_U32x4_LDSM_N>;
  using LdsmT = Copy_Traits<SM75_U16x8_LDSM_T>;
  using Shape = typename Mma::Shape_MNK;
  std::printf("{\n");
  std::printf("  \"mma_shape_mnk\": [%d, %d, %d],\n", int(size<0>(Shape{})),
              int(size<1>(Shape{})), int(size<2>(Shape{})));
  print_identity_check("mma_thr_id_is_lane", typename Mma::ThrID{});
  print_identity_check("ldsm_n_thr_id_is_lane", typename LdsmN::ThrID{});
  print_identity_check("ldsm_t_thr_id_is_lane", typename LdsmT::ThrID{});
  print_table("mma_a", typename Mma::ALayout{});
  print_table("mma_b", typename Mma::BLayout{});
  print_table("mma_c", typename Mma::CLayout{});
  print_table("ldsm_n_src", typename LdsmN::SrcLayout{});
  print_table("ldsm_n_dst", typename LdsmN::DstLayout{});
  print_table("ldsm_t_src", typename LdsmT::SrcLayout{});
  print_table("ldsm_t_dst", typename LdsmT::DstLayout{}, true);
  std::printf("}\n");
  return 0;
}
