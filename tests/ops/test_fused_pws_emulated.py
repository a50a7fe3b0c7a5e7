"""The fused frozen-classifier forward (lse AND pws; csrc/cuda/margin_fused_pws_kernels.cuh) and
its PV-orientation tile check on the CPU emulator, against numpy. No GPU needed.

As in test_fused_emulated.py: mma.sync / ldmatrix(.trans) / cp.async are the PTX-ISA emulations
of mma_common.cuh, every launch runs under two thread-schedule seeds (bit-identical outputs) with
the shared-memory race check. pws uses P' = exp(z - m) * inv_nw rounded to bf16 (the epilogue
provider's e block), which is ~2^-9 away from float64 per element: pws is therefore checked
within 1e-5 against a float64 replay of the kernel's tiling that rounds P' the same way (S
replayed as the emulated k16 steps, logits in fp32), and loosely against the plain float64
softmax; lse within 1e-5 of plain float64.
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
BN = 64  # classes per tile of the kernel (fpws::kBN)


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()




def to_bf16(v):
    return emu.bf16_to_f32(emu.bf16_bits(np.asarray(v, F32))).astype(F64)


# ---- (1) the PV orientation: d = c + p @ w through C->A packing and ldmatrix.trans ------------

def run_pv_tile(p_bits, w_bits, c, variant=None):
    out = emu.run("fused_pv_tile", dict(p=p_bits, w=w_bits, c=c), {}, seeds=SEEDS, variant=variant)
    return np.frombuffer(out["d"], F32).reshape(16, 16)


def test_pv_tile_matches_numpy():
    """d = c + p @ w with w row-major [k][n]: bit for bit the float64 result rounded to fp32
    (the emulated mma sums exactly and rounds once); p = I returns w itself."""
    rng = np.random.default_rng(0)
    (p_bits, p), (w_bits, w) = bf16(rng, (16, 16)), bf16(rng, (16, 16))
    c = rng.standard_normal((16, 16)).astype(F32)
    np.testing.assert_array_equal(run_pv_tile(p_bits, w_bits, c), (c.astype(F64) + p @ w).astype(F32))
    eye_bits, _ = emu.encode(np.eye(16, dtype=F32), "bfloat16")
    np.testing.assert_array_equal(run_pv_tile(eye_bits, w_bits, np.zeros((16, 16), F32)), w.astype(F32))


@pytest.mark.parametrize("variant", ["pack_halves", "mma_layout"])
def test_pv_tile_broken_layout_fails(variant):
    """Negative controls: the bf16x2 halves swapped in the C->A pack, or two A registers swapped
    in the mma, must change the result."""
    rng = np.random.default_rng(1)
    (p_bits, p), (w_bits, w) = bf16(rng, (16, 16)), bf16(rng, (16, 16))
    c = np.zeros((16, 16), F32)
    d = run_pv_tile(p_bits, w_bits, c, variant=variant)
    assert not np.array_equal(d, (p @ w).astype(F32))


# ---- (2) lse and pws against float64 ---------------------------------------------------------

def plain_ref(a, x, w, scale):
    """(lse, pws) over each row's non-target columns, in float64 without any bf16 rounding of
    the probabilities."""
    z = logits64(a, x, w, scale)
    m = z.max(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(z - np.where(np.isneginf(m), 0, m)[:, None])
        lse = np.where(np.isneginf(m), -np.inf, m + np.log(e.sum(1)))
        pws = (e @ (w * a["inv_nw"].astype(F64)[:, None])) / e.sum(1)[:, None]
    return lse, pws


def replay_pws(a, x, w, d, scale, splits):
    """pws of the kernel's algorithm in float64, except where the kernel rounds: S per emulated
    k16 step (fp32), logits and p in fp32, P' = p * inv_nw in bf16 per 64-class tile with the
    running max of the split, each row's target column left out (-inf)."""
    B, C = x.shape[0], w.shape[0]
    s = np.zeros((B, C), F32)
    for k in range(0, d, 16):  # each k16 step: exact sum added in double, rounded to fp32
        s = (s.astype(F64) + x[:, k:k + 16] @ w[:, k:k + 16].T).astype(F32)
    inx, inw = a["inv_nx"], a["inv_nw"]
    z = ((F32(scale) * s) * inx[:, None]) * inw[None, :]
    lab = a["labels"]
    rows = np.nonzero((lab >= 0) & (lab < C))[0]
    z[rows, lab[rows]] = -np.inf
    is_t = np.zeros((B, C), bool)
    is_t[rows, lab[rows]] = True
    n_tiles = -(-C // BN)
    tps = -(-n_tiles // min(splits, n_tiles))
    ms, ls, os_ = [], [], []
    for c0 in range(0, n_tiles * BN, tps * BN):
        c1 = min(C, c0 + tps * BN)
        m = np.full(B, -np.inf, F32)
        l = np.zeros(B, F64)
        o = np.zeros((B, d), F64)
        for n0 in range(c0, c1, BN):
            n1 = min(c1, n0 + BN)
            zt = z[:, n0:n1]
            m_new = np.maximum(m, zt.max(1))
            ref = np.where(np.isneginf(m_new), F32(0), m_new).astype(F32)
            with np.errstate(invalid="ignore"):
                p = np.exp((zt - ref[:, None]).astype(F64)).astype(F32)
                alpha = np.exp((m - ref).astype(F64))
            l = l * alpha + p.sum(1, dtype=F64)
            pp = to_bf16(np.where(is_t[:, n0:n1], F32(0), p * inw[None, n0:n1]))
            o = o * alpha[:, None] + pp @ w[n0:n1]
            m = m_new
        ms.append(m.astype(F64)), ls.append(l), os_.append(o)
    M = np.max(ms, axis=0)
    fin = ~np.isneginf(M)
    Mr = np.where(fin, M, 0)
    L = sum(l * np.where(fin, np.exp(m - Mr), 0) for m, l in zip(ms, ls))
    O = sum(o * np.where(fin, np.exp(m - Mr), 0)[:, None] for m, o in zip(ms, os_))
    with np.errstate(invalid="ignore", divide="ignore"):
        return O / L[:, None]


def run_pws(a, B, C, d, scale, splits, variant=None, **extra):
    out = emu.run("fused_pws", a, dict(B=B, C=C, d=d, scale=scale, splits=splits, **extra),
                  seeds=SEEDS, variant=variant)
    return np.frombuffer(out["lse"], F64), np.frombuffer(out["pws"], F32).reshape(B, d)


def scaled_err(got, ref):
    got, ref = np.asarray(got, F64), np.asarray(ref, F64)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[~fin], ref[~fin])
    return float((np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin]))).max(initial=0.0))


def row_err(got, ref):
    """max over rows of max|got - ref| / max|ref| (NaN rows must match)."""
    got, ref = np.asarray(got, F64), np.asarray(ref, F64)
    nan = np.isnan(ref).any(1)
    assert np.array_equal(np.isnan(got).any(1), nan)
    assert np.isnan(got[nan]).all()
    g, r = got[~nan], ref[~nan]
    if g.size == 0:
        return 0.0
    return float((np.abs(g - r).max(1) / np.maximum(np.abs(r).max(1), 1e-30)).max())


def check(a, x, w, B, C, d, scale, splits):
    lse, pws = run_pws(a, B, C, d, scale, splits)
    lse_ref, pws_plain = plain_ref(a, x, w, scale)
    assert scaled_err(lse, lse_ref) <= 1e-5
    assert row_err(pws, replay_pws(a, x, w, d, scale, splits)) <= 1e-5
    assert row_err(pws, pws_plain) <= 2e-2  # the bf16 rounding of P' (2^-9 per element)
    return lse, pws


# (B, C, d, splits). Covers: C = 1 / 7 (one partial tile), 64 / 65 (a one-class second tile);
# d = 8, 16, 40 (padded to 64; zero-filled cp.async chunks), 100 (plain-load path, padded to
# 128), 128, 256, 512; B = 1, 3, 64, 65, 130 (row-tile tails, a dead warp row); 1..5 splits
# (targets in other splits, splits past the tile count clamped).
CASES = [(1, 1, 16, 1), (3, 7, 8, 2), (64, 65, 40, 2), (65, 300, 100, 3), (130, 64, 128, 1),
         (3, 1000, 256, 5), (64, 1000, 512, 4), (1, 300, 512, 1), (65, 7, 16, 1)]


@pytest.mark.parametrize("B,C,d,splits", CASES)
def test_fused_pws_matches_float64(B, C, d, splits):
    rng = np.random.default_rng(B * 1000 + C + d)
    scale = 16.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    if B > 4:  # targets in several splits, also the first and last class and a tile edge
        a["labels"][:4] = [0, C - 1, min(C - 1, BN), min(C - 1, 2 * BN - 1)]
    if C == 1:
        a["labels"][:] = -1
    check(a, x, w, B, C, d, scale, splits)


def test_fused_pws_random_shapes(seed):
    """Fresh draws each run (the seed is printed): shape, splits, scale, labels. Bounds that do
    not depend on where bf16 rounding boundaries fall: lse within 1e-5 of float64, pws within
    2e-2 of each row's largest entry (the replay bound, 1e-5, is checked on the fixed cases)."""
    rng = np.random.default_rng(seed)
    B, C = int(rng.integers(1, 70)), int(rng.integers(1, 400))
    d, splits = int(rng.choice([8, 24, 64, 100, 128, 200])), int(rng.integers(1, 5))
    scale = float(rng.uniform(1, 40))
    a, x, w = fused_inputs(rng, B, C, d, scale)
    lse, pws = run_pws(a, B, C, d, scale, splits)
    lse_ref, pws_plain = plain_ref(a, x, w, scale)
    assert scaled_err(lse, lse_ref) <= 1e-5
    assert row_err(pws, pws_plain) <= 2e-2


def test_fused_pws_across_split_counts():
    """Each split count matches its own replay within 1e-5; between split counts the running
    maxima (hence the bf16 roundings of P') differ, so pws moves at the bf16 level only."""
    rng = np.random.default_rng(11)
    B, C, d, scale = 9, 600, 32, 30.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    l1, p1 = check(a, x, w, B, C, d, scale, 1)
    l5, p5 = check(a, x, w, B, C, d, scale, 5)
    assert scaled_err(l5, l1) <= 1e-5 and row_err(p5, p1) <= 1e-2


def test_fused_pws_leaves_the_target_column_out():
    """The statistics are those of each row's non-target columns, also for well-classified rows
    (each row's target class lies along the row: logit 64 against ~8 elsewhere, so a target column
    that is not left out would dominate lse and pws); C = 1 with the target the only column gives
    lse = -inf and pws = NaN (0 / 0; the caller maps that row to 0)."""
    rng = np.random.default_rng(5)
    B, C, d, scale = 5, 130, 64, 64.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    a["labels"][:] = [3, 64, 129, 0, 77]
    for i, j in enumerate(a["labels"]):
        a["w"][j], w[j] = a["x"][i], x[i]
        a["inv_nw"][j] = a["inv_nx"][i]
    check(a, x, w, B, C, d, scale, 2)

    a1, x1, w1 = fused_inputs(rng, 2, 1, 16, 4.0)
    a1["labels"][:] = 0
    lse, pws = run_pws(a1, 2, 1, 16, 4.0, 1)
    assert np.isneginf(lse).all() and np.isnan(pws).all()


def test_fused_pws_neg_inf_rows():
    """Rows with no logit left (C = 1, the target left out): lse = -inf, pws = NaN (0 / 0, as the
    other providers); the neighbour without a target is unaffected."""
    rng = np.random.default_rng(7)
    a, x, w = fused_inputs(rng, 3, 1, 16, 4.0)
    a["labels"] = np.array([0, 0, -1], np.int64)
    lse, pws = run_pws(a, 3, 1, 16, 4.0, 1)
    assert np.isneginf(lse[:2]).all() and np.isnan(pws[:2]).all()
    assert np.isfinite(lse[2]) and np.isfinite(pws[2]).all()
    lse_ref, pws_ref = plain_ref(a, x, w, 4.0)
    assert scaled_err(lse, lse_ref) <= 1e-6
    assert row_err(pws, pws_ref) <= 1e-2  # row 2: P' = bf16(inv_nw)
    assert row_err(pws, replay_pws(a, x, w, 16, 4.0, 1)) <= 1e-5


# ---- (3) negative controls -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["pws_b2", "pws_b3"])
def test_dropped_barrier_is_a_race(variant):
    rng = np.random.default_rng(3)
    a, _, _ = fused_inputs(rng, 20, 130, 16, 8.0)
    with pytest.raises(emu.EmulatorError) as e:
        run_pws(a, 20, 130, 16, 8.0, 1, variant=variant)
    assert e.value.returncode == emu.EXIT_EMULATOR_ERROR
    assert "race" in e.value.stderr or "no thread" in e.value.stderr, e.value.stderr


def test_swapped_pack_halves_is_caught():
    rng = np.random.default_rng(4)
    B, C, d, scale = 20, 130, 16, 8.0
    a, x, w = fused_inputs(rng, B, C, d, scale)
    _, pws = run_pws(a, B, C, d, scale, 1, variant="pack_halves")
    assert row_err(pws, replay_pws(a, x, w, d, scale, 1)) > 1e-3


# ---- (4) arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("params,message", [
    (dict(d=0), "positive"),
    (dict(d=520), "epilogue provider"),
    (dict(null="x"), "null pointer"),
    (dict(null="pws"), "null pointer"),
    (dict(null="workspace"), "null pointer"),
    (dict(splits=0), "splits"),
    (dict(ws_floats=5), "workspace"),
])
def test_fused_pws_refuses_bad_arguments(params, message):
    rng = np.random.default_rng(3)
    p = dict(B=3, C=5, d=8, scale=1.0, splits=1)
    p.update(params)
    with np.errstate(divide="ignore"):
        a, _, _ = fused_inputs(rng, p["B"], p["C"], p["d"], 1.0)
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("fused_pws", a, p, seeds=(1,))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and message in e.value.stderr
