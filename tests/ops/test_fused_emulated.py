"""The fused tensor-core forward (csrc/cuda/margin_fused*, mma_common.cuh) on the CPU emulator,
against numpy in float64. No GPU needed.

mma.sync / ldmatrix / cp.async run as the emulations in mma_common.cuh, which give each lane the
register contents the PTX ISA documents: these tests check the kernel's fragment plumbing and
pipeline against the documented layouts, not against hardware. Every launch runs under two
thread-schedule seeds (bit-identical outputs required) with the shared-memory race check and
guard pages behind every buffer: an emulator error (race, deadlock, a read of a stage whose
cp.async has not been waited for) fails the test.
"""
from __future__ import annotations


import numpy as np
import pytest

import kernel_emulator as emu
from fused_reference import bf16, fused_inputs, logits64

pytestmark = pytest.mark.emulated

SEEDS = (1, 2)
F32 = np.float32
F64 = np.float64
BK, BN = 32, 128  # depth slice and class tile of the kernel (margin_fused_kernels.cuh)


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()




def scaled_err(got, ref):
    got, ref = np.asarray(got, F64), np.asarray(ref, F64)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[~fin], ref[~fin])
    return float((np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin]))).max(initial=0.0))


# ---- (1) the fragment plumbing: one 16x16 @ (16x16)^T tile through cp.async, ldmatrix, mma ----

def run_tile(a_bits, b_bits, c, variant=None):
    out = emu.run("fused_mma_tile", dict(a=a_bits, b=b_bits, c=c), {}, seeds=SEEDS, variant=variant)
    return np.frombuffer(out["d"], F32).reshape(16, 16)


def test_mma_tile_matches_numpy():
    """d = c + a @ b^T: every element lands where the documented C/D layout says. The emulated
    mma sums exactly and rounds once, so the result is the float64 one rounded to fp32."""
    rng = np.random.default_rng(0)
    (a_bits, a), (b_bits, b) = bf16(rng, (16, 16)), bf16(rng, (16, 16))
    c = rng.standard_normal((16, 16)).astype(F32)
    d = run_tile(a_bits, b_bits, c)
    ref = c.astype(F64) + a @ b.T
    np.testing.assert_array_equal(d, ref.astype(F32))
    # Structured inputs name the culprit if a layout is wrong: a = I picks rows of b.
    eye_bits, _ = emu.encode(np.eye(16, dtype=F32), "bfloat16")
    d = run_tile(eye_bits, b_bits, np.zeros((16, 16), F32))
    np.testing.assert_array_equal(d, b.T.astype(F32))


# ---- (2) the fused lse against float64 -------------------------------------------------------

def ref_lse(a, x, w, scale):
    z = logits64(a, x, w, scale)
    m = z.max(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isneginf(m), -np.inf,
                        m + np.log(np.exp(z - np.where(np.isneginf(m), 0, m)[:, None]).sum(1)))


def run_fused(a, B, C, d, scale, splits, **extra):
    out = emu.run("fused_stats", a, dict(B=B, C=C, d=d, scale=scale, splits=splits, **extra),
                  seeds=SEEDS)
    return np.frombuffer(out["lse"], F64)


# (B, C, d, splits): B = 1 / C = 1; d % 16 != 0 (zero-filled cp.async chunks); odd d (plain-load
# path); several class splits with targets in each; splits past the tile count (clamped); two row
# tiles with a tail; a class tail that leaves one warp column idle.
CASES = [(1, 1, 16, 1), (37, 1000, 40, 4), (5, 300, 129, 2), (3, 130, 512, 1), (20, 257, 64, 3),
         (4, 200, 16, 5), (130, 70, 24, 1), (37, 1000, 512, 3), (1, 1000, 16, 2)]


@pytest.mark.parametrize("B,C,d,splits", CASES)
def test_fused_lse_matches_float64(B, C, d, splits):
    rng = np.random.default_rng(B * 1000 + C + d)
    scale = 16.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    if B > 4:  # targets in every split, also the first and last class
        a["labels"][:4] = [0, C - 1, min(C - 1, BN), min(C - 1, 2 * BN + 5)]
    if C == 1:  # else the single column is the target, left out: lse = -inf
        a["labels"][:] = -1
    lse = run_fused(a, B, C, d, scale, splits)
    assert scaled_err(lse, ref_lse(a, x, w, scale)) <= 1e-5


def test_fused_lse_neg_inf_rows():
    """C = 1 with the row's target the only column (left out): lse = -inf (no NaN); a row
    without target gets its one logit."""
    rng = np.random.default_rng(7)
    a, x, w = fused_inputs(rng, 3, 1, 16, 4.0)
    a["labels"] = np.array([0, 0, -1], np.int64)
    lse = run_fused(a, 3, 1, 16, 4.0, 1)
    assert np.isneginf(lse[:2]).all() and np.isfinite(lse[2])
    assert scaled_err(lse, ref_lse(a, x, w, 4.0)) <= 1e-6


def test_fused_lse_same_across_split_counts():
    """The partition of the classes changes only fp32 rounding."""
    rng = np.random.default_rng(11)
    B, C, d, scale = 9, 600, 32, 30.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    ref = ref_lse(a, x, w, scale)
    for splits in (1, 5):
        assert scaled_err(run_fused(a, B, C, d, scale, splits), ref) <= 1e-5


# ---- (4) arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("case,params,message", [
    ("d0", dict(d=0), "positive"),
    ("null_x", dict(null="x"), "null pointer"),
    ("null_lse", dict(null="lse"), "null pointer"),
    ("null_workspace", dict(null="workspace"), "null pointer"),
    ("splits0", dict(splits=0), "splits"),
    ("small_workspace", dict(ws_floats=5), "workspace"),
])
def test_fused_lse_refuses_bad_arguments(case, params, message):
    rng = np.random.default_rng(3)
    p = dict(B=3, C=5, d=8, scale=1.0, splits=1)
    p.update(params)
    a, _, _ = fused_inputs(rng, p["B"], p["C"], p["d"], 1.0)
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("fused_stats", a, p, seeds=(1,))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and message in e.value.stderr
