"""The fused kernels' tensor-core fragment layouts against CUTLASS/CuTe's, not only our reading
of the PTX ISA. No GPU needed.

Every other emulated test checks the fused kernels against the emulations in mma_common.cuh,
which encode our reading of the PTX ISA; a misreading shared by kernel and emulation would pass
them and fail on the first GPU. Here the same instructions are compared with CuTe's layouts
(MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>, Copy_Traits<SM75_U32x4_LDSM_N> and
<SM75_U16x8_LDSM_T>), evaluated from CuTe's headers (cute_layouts.py), which CUTLASS's kernels
run on hardware:
  (1) each emulated instruction (mma, ldmatrix, ldmatrix.trans) on random register contents;
  (2) the kernels' own per-lane addressing (a_ld_*, b_ld_*, bt_ld_*, acc_*; read back from the
      compiled mma_common.cuh) fed through CuTe's ldmatrix layouts must yield exactly CuTe's mma
      fragments, without any of our emulations;
  (3) c_to_a (accumulators handed on as an A operand) against CuTe's C and A layouts.
Together with the emulated kernel tests this ties kernel -> emulation -> CuTe. What stays
unchecked without a GPU: the bf16x2 half order of cvt (ours matches CUTLASS's
NumericArrayConverter<bfloat16_t, float, 2>, by reading), and the hardware's rounding.
"""
from __future__ import annotations


import numpy as np
import pytest

import cute_layouts
import kernel_emulator as emu

pytestmark = pytest.mark.emulated

SEEDS = (1, 2)
LANES = np.arange(32)


@pytest.fixture(scope="module")
def cute() -> dict:
    if cute_layouts.nvcc() is None:
        pytest.skip("needs nvcc to evaluate CuTe's layouts")
    if cute_layouts.cutlass_include_dir() is None:
        pytest.skip("needs the nvidia-cutlass wheel (in the test extra)")
    t = cute_layouts.tables()
    assert list(t["mma_shape_mnk"]) == [16, 8, 16]
    assert t["mma_thr_id_is_lane"] and t["ldsm_n_thr_id_is_lane"] and t["ldsm_t_thr_id_is_lane"]
    return t


@pytest.fixture(scope="module", autouse=True)
def _built():
    emu.require_built()


def probe(case: str, variant=None, **arrays) -> np.ndarray:
    out = emu.run("fragment_probe", arrays, {"case": case}, seeds=SEEDS, variant=variant)
    return np.frombuffer(out["out"], np.uint32).reshape(32, -1)


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


# ---- layout helpers (CuTe conventions: column-major coordinates, value v of a bf16 operand is
# half v % 2 of register v // 2) ------------------------------------------------------------

def pack_pairs(halves: np.ndarray) -> np.ndarray:
    """(32, 2r) uint16 values -> (32, r) uint32 registers, value 2j in the low half of j."""
    h = halves.astype(np.uint32)
    return h[:, 0::2] | (h[:, 1::2] << 16)


def register_bits(regs: np.ndarray) -> np.ndarray:
    """(32, 4) uint32 -> (32, 128) bits; bit v is bit v % 32 of register v // 32."""
    return ((regs[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(32, 128)


def cute_ldmatrix(dst: np.ndarray, rows16: np.ndarray) -> np.ndarray:
    """What CuTe says ldmatrix .x4 delivers: rows16[l] (8 uint16) is the 16-byte row whose address
    lane l gives (the source layout is checked to be lane l -> bits 128 l..128 l + 127)."""
    src = register_bits(pack_pairs(rows16)).reshape(-1)
    bits = src[dst].astype(np.uint32)  # (32, 128): bit v of lane t = source bit dst[t, v]
    return (bits.reshape(32, 4, 32) << np.arange(32, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)


def operand_from_fragments(table: np.ndarray, regs: np.ndarray, ld: int, shape) -> np.ndarray:
    """Scatters bf16 fragments (32, n) uint32 into the matrix the CuTe layout `table` names
    (index = row + ld * col, column-major); every element must be written exactly once."""
    vals = np.stack([regs & 0xFFFF, regs >> 16], axis=2).reshape(32, -1).astype(np.uint16)
    out = np.zeros(shape[0] * shape[1], np.uint16)
    out[table.reshape(-1)] = vals.reshape(-1)
    return out.reshape(shape[1], shape[0]).T  # column-major index -> [row, col]


def fragments_from_operand(table: np.ndarray, mat_u16: np.ndarray) -> np.ndarray:
    """The (32, n / 2) uint32 registers of a bf16 operand laid out by `table` (idx = r + ld c)."""
    flat = np.asarray(mat_u16).T.reshape(-1)  # column-major
    return pack_pairs(flat[table])


def unique_codes(shape, rng) -> np.ndarray:
    """Distinct uint16 values, so every misplaced element shows."""
    return rng.permutation(65536)[: int(np.prod(shape))].astype(np.uint16).reshape(shape)


# ---- the tables themselves ---------------------------------------------------------------------

def test_cute_tables_are_permutations(cute):
    """Each (thread, value) layout covers its tile exactly once, and the ldmatrix source layout is
    'lane l gives row l' (the convention of our probes and kernels)."""
    for name, n in [("mma_a", 256), ("mma_b", 128), ("mma_c", 128),
                    ("ldsm_n_dst", 4096), ("ldsm_t_dst", 4096)]:
        assert np.array_equal(np.sort(cute[name].reshape(-1)), np.arange(n)), name
    row_per_lane = 128 * LANES[:, None] + np.arange(128)[None, :]
    assert np.array_equal(cute["ldsm_n_src"], row_per_lane)
    assert np.array_equal(cute["ldsm_t_src"], row_per_lane)


# ---- (1) the emulated instructions -----------------------------------------------------------

def emulated_mma_error(cute, variant=None) -> tuple[float, int]:
    """max |emulated d - (c + a b)| for random fragments placed by CuTe's layouts."""
    rng, seed = fresh_rng()
    a = emu.bf16_to_f32(emu.bf16_bits(rng.standard_normal((16, 16)).astype(np.float32)))
    b_nk = emu.bf16_to_f32(emu.bf16_bits(rng.standard_normal((8, 16)).astype(np.float32)))
    c = rng.standard_normal((16, 8)).astype(np.float32)
    a_regs = fragments_from_operand(cute["mma_a"], emu.bf16_bits(a))
    b_regs = fragments_from_operand(cute["mma_b"], emu.bf16_bits(b_nk))
    c_frag = c.T.reshape(-1)[cute["mma_c"]]  # idx = m + 16 n
    d_frag = probe("mma", variant, a=a_regs, b=b_regs, c=c_frag).view(np.float32)
    d = np.zeros(128, np.float64)
    d[cute["mma_c"].reshape(-1)] = d_frag.reshape(-1)
    d = d.reshape(8, 16).T
    ref = c.astype(np.float64) + a.astype(np.float64) @ b_nk.astype(np.float64).T
    return float(np.abs(d - ref).max() / np.abs(ref).max()), seed


def test_emulated_mma_matches_cute_layouts(cute):
    """A, B and C/D fragments placed by CuTe's layouts give d = c + a b through our emulated
    mma.sync (which rounds an exact sum once, so the error is fp32 rounding)."""
    err, seed = emulated_mma_error(cute)
    assert err < 1e-6, f"seed {seed}: relative error {err}"


def test_mma_comparison_catches_swapped_a_registers(cute):
    """Negative control: the emulator variant with A registers 1 and 2 swapped disagrees."""
    err, seed = emulated_mma_error(cute, variant="mma_layout")
    assert err > 1e-2, f"seed {seed}: the swapped layout went unnoticed ({err})"


@pytest.mark.parametrize("case, table", [("ldmatrix", "ldsm_n_dst"), ("ldmatrix_trans", "ldsm_t_dst")])
def test_emulated_ldmatrix_matches_cute(cute, case, table):
    """Every register bit each lane receives is the source bit CuTe's layout names."""
    rng, seed = fresh_rng()
    rows = unique_codes((32, 8), rng)
    got = probe(case, tile=pack_pairs(rows))
    assert np.array_equal(got, cute_ldmatrix(cute[table], rows)), f"seed {seed}"


def test_ldmatrix_comparison_tells_plain_from_trans(cute):
    """Negative control: the .trans emulation compared with the plain layout must fail."""
    rng, _ = fresh_rng()
    rows = unique_codes((32, 8), rng)
    got = probe("ldmatrix_trans", tile=pack_pairs(rows))
    assert not np.array_equal(got, cute_ldmatrix(cute["ldsm_n_dst"], rows))


# ---- (2) the kernels' addressing through CuTe's layouts, no emulation --------------------------

@pytest.fixture(scope="module")
def addressing() -> dict:
    raw = probe("addressing").view(np.int32)
    names = ["a_row", "a_col", "b_row", "b_col", "bt_row", "bt_col"]
    out = {n: raw[:, i] for i, n in enumerate(names)}
    out["acc_row"], out["acc_col"] = raw[:, 6::2], raw[:, 7::2]
    return out


def ldmatrix_rows(mat: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The 16-byte row each lane points ldmatrix at: mat[row[l], col[l]:col[l] + 8]."""
    assert np.all(col % 8 == 0)
    return np.stack([mat[r, c:c + 8] for r, c in zip(row, col)])


def a_recipe_ok(cute, row, col) -> bool:
    """ldmatrix .x4 at (row, col) of a row-major 16 x 16 A gives CuTe's A fragment."""
    a = unique_codes((16, 16), np.random.default_rng(0))
    regs = cute_ldmatrix(cute["ldsm_n_dst"], ldmatrix_rows(a, row, col))
    return np.array_equal(regs, fragments_from_operand(cute["mma_a"], a))


def test_a_operand_addressing_gives_cute_fragments(cute, addressing):
    assert a_recipe_ok(cute, addressing["a_row"], addressing["a_col"])
    # Negative control: the two k halves swapped.
    assert not a_recipe_ok(cute, addressing["a_row"], 8 - addressing["a_col"])


def b_tiles(cute, b_nk: np.ndarray) -> np.ndarray:
    """CuTe's B fragments of the two n8 tiles of a 16(n) x 16(k) operand, as ldmatrix .x4
    registers: tile 0 in registers 0-1, tile 1 in 2-3."""
    return np.concatenate([fragments_from_operand(cute["mma_b"], b_nk[8 * q:8 * q + 8])
                           for q in range(2)], axis=1)


def test_b_operand_addressing_gives_cute_fragments(cute, addressing):
    """B stored as rows of depth (w, the gallery: [n][k]) through plain ldmatrix .x4."""
    b_nk = unique_codes((16, 16), np.random.default_rng(1))
    regs = cute_ldmatrix(cute["ldsm_n_dst"], ldmatrix_rows(b_nk, addressing["b_row"], addressing["b_col"]))
    assert np.array_equal(regs, b_tiles(cute, b_nk))


def test_transposed_b_addressing_gives_cute_fragments(cute, addressing):
    """B stored row-major as [k][n] (the w tile of P @ W) through ldmatrix .x4 .trans."""
    b_kn = unique_codes((16, 16), np.random.default_rng(2))
    rows = ldmatrix_rows(b_kn, addressing["bt_row"], addressing["bt_col"])
    assert np.array_equal(cute_ldmatrix(cute["ldsm_t_dst"], rows), b_tiles(cute, b_kn.T))
    # Negative control: the same addresses through the plain layout.
    assert not np.array_equal(cute_ldmatrix(cute["ldsm_n_dst"], rows), b_tiles(cute, b_kn.T))


def test_accumulator_coordinates_are_cute_c_layout(cute, addressing):
    m, n = cute["mma_c"] % 16, cute["mma_c"] // 16
    assert np.array_equal(addressing["acc_row"], m)
    assert np.array_equal(addressing["acc_col"], n)


# ---- (3) C -> A ------------------------------------------------------------------------------

def test_c_to_a_gives_cute_a_fragment(cute):
    """Two m16n8 accumulator tiles (columns 0-7, 8-15) packed by c_to_a are CuTe's A fragment of
    the 16 x 16 block with the C columns as k, rounded to bf16."""
    rng, seed = fresh_rng()
    p = rng.standard_normal((16, 16)).astype(np.float32)
    m, n = cute["mma_c"] % 16, cute["mma_c"] // 16
    c = np.concatenate([p[m, n], p[m, 8 + n]], axis=1).astype(np.float32)  # (32, 8): t0, t1
    got = probe("c_to_a", c=c)
    assert np.array_equal(got, fragments_from_operand(cute["mma_a"], emu.bf16_bits(p))), f"seed {seed}"
