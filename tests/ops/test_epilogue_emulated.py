"""The epilogue kernels (csrc/cuda/margin_epilogue*) on the CPU emulator (csrc/emulator/), against
their PyTorch twin (bct_fast.ops.margin_epilogue_torch) and float64. No GPU needed.

Each case runs the library's launcher under several thread-schedule seeds (bit-identical outputs
required; shared-memory race check, guard pages behind every buffer) on one score block, as the
chunk loop of bct_fast.ops.margin_softmax_epilogue hands it over. The last test runs that chunk
loop itself with the emulated kernels injected as its epilogue.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

import kernel_emulator as emu
from bct_fast.ops import margin_epilogue_torch as twin
from bct_fast.ops import margin_softmax_epilogue as epi
from bct_fast.ops import margin_softmax_torch
from bct_fast.ops.rows import inv_row_norms

pytestmark = pytest.mark.emulated

SEEDS = (1, 2, 3)
F32 = np.float32
OUT_CODES = {torch.float32: 0, torch.bfloat16: 2}


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()


def block_inputs(rng, B, cols, c0, scale=16.0, d=24):
    """A score block as the loop produces it: S = x @ w_c.T (fp32), inverse norms, labels inside
    this chunk, in another chunk and -1."""
    x = rng.standard_normal((B, d)).astype(F32)
    w = rng.standard_normal((cols, d)).astype(F32)
    scores = (x @ w.T).astype(F32)
    inv_nx = (1 / np.linalg.norm(x.astype(np.float64), axis=1)).astype(F32)
    inv_nw = (1 / np.linalg.norm(w.astype(np.float64), axis=1)).astype(F32)
    labels = rng.integers(c0, c0 + cols, B).astype(np.int64)
    labels[rng.random(B) < 0.25] = -1
    labels[rng.random(B) < 0.2] = c0 + cols + 3  # a target in a later chunk
    return dict(scores=scores, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels)


def target_cells(a, c0, cols):
    """(rows, columns) of the block's target cells."""
    local = a["labels"] - c0
    rows = np.nonzero((a["labels"] >= 0) & (local >= 0) & (local < cols))[0]
    return rows, local[rows]


def ref_z(a, c0, scale):
    """float64 logits of the block, each row's target column left out (-inf) as the kernels do
    (the caller combines the results with the margin logit)."""
    z = scale * a["scores"].astype(np.float64) * a["inv_nx"].astype(np.float64)[:, None] \
        * a["inv_nw"].astype(np.float64)[None, :]
    rows, cols = target_cells(a, c0, z.shape[1])
    z[rows, cols] = -np.inf
    return z


def without_targets(block, a, c0):
    """The coefficient blocks hold 0 in the target cells (the chunk loop adds that term)."""
    block = block.copy()
    block[target_cells(a, c0, block.shape[1])] = 0.0
    return block


def tensors(a):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}


def decode(raw: bytes, dtype: torch.dtype, shape) -> np.ndarray:
    if dtype == torch.float32:
        return np.frombuffer(raw, F32).reshape(shape)
    return emu.bf16_to_f32(np.frombuffer(raw, np.uint16)).reshape(shape)


def scaled_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[~fin], ref[~fin])
    return float((np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin]))).max(initial=0.0))


def run_stats(a, m0, l0, c0, scale, e_dtype):
    B, cols = a["scores"].shape
    params = dict(B=B, cols=cols, c0=c0, scale=scale, with_e=e_dtype is not None,
                  out_dtype=OUT_CODES.get(e_dtype, 0))
    out = emu.run("epi_stats", dict(a, m=m0, l=l0), params, seeds=SEEDS)
    m, l = np.frombuffer(out["m"], F32), np.frombuffer(out["l"], F32)
    if e_dtype is None:
        return m, l, None, None
    return m, l, decode(out["e"], e_dtype, (B, cols)), np.frombuffer(out["alpha"], F32)


STATS_CASES = [(1, 1, 0), (3, 33, 0), (5, 300, 64), (33, 257, 1000), (2, 600, 7)]


@pytest.mark.parametrize("B,cols,c0", STATS_CASES)
@pytest.mark.parametrize("e_dtype", [None, torch.float32, torch.bfloat16], ids=["no_e", "e_fp32", "e_bf16"])
def test_stats_epilogue(B, cols, c0, e_dtype):
    """m, l, e, alpha vs the twin (same z bit for bit: m equal, the rest within a few fp32 ulps;
    bf16 e within one bf16 rounding) and vs float64; running statistics from an earlier chunk."""
    rng = np.random.default_rng(B * 7 + cols + c0)
    scale = 16.0
    a = block_inputs(rng, B, cols, c0, scale)
    m0 = rng.uniform(-20, 20, B).astype(F32)
    m0[0] = -np.inf  # the first chunk of this row: nothing accumulated yet
    l0 = np.where(np.isinf(m0), 0, rng.uniform(0.5, 3, B)).astype(F32)
    m, l, e, alpha = run_stats(a, m0, l0, c0, scale, e_dtype)

    t = tensors(a)
    tm, tl = torch.from_numpy(m0.copy()), torch.from_numpy(l0.copy())
    te = torch.empty(B, cols, dtype=e_dtype) if e_dtype is not None else None
    ta = torch.empty(B) if e_dtype is not None else None
    twin.stats_epilogue(t["scores"], t["inv_nx"], t["inv_nw"], t["labels"], c0,
                        scale, tm, tl, te, ta)
    np.testing.assert_array_equal(m, tm.numpy())  # the same z and an exact max
    assert scaled_err(l, tl.numpy()) < 2e-6

    z = ref_z(a, c0, scale)
    m_ref = np.maximum(m0.astype(np.float64), z.max(1))
    alpha_ref = np.where(np.isneginf(m0), 0.0, np.exp(m0 - m_ref))
    with np.errstate(invalid="ignore"):  # a row with nothing finite yet: 0, not exp(-inf - -inf)
        e_ref = np.where(np.isneginf(m_ref)[:, None], 0.0, np.exp(z - m_ref[:, None]))
    l_ref = l0 * alpha_ref + e_ref.sum(1)
    assert scaled_err(m, m_ref) == 0 or scaled_err(m, m_ref) < 1e-6
    assert scaled_err(l, l_ref) < 1e-5
    if e_dtype is not None:
        assert scaled_err(alpha, alpha_ref) < 1e-6 and scaled_err(alpha, ta.numpy()) < 1e-6
        e_ref = without_targets(e_ref * a["inv_nw"].astype(np.float64)[None, :], a, c0)
        assert (e[target_cells(a, c0, cols)] == 0).all(), "e: target cells must hold 0"
        for name, ref, rel in (("twin", te.float().numpy(), 1e-6), ("float64", e_ref, 1e-5)):
            rel += 2.0 ** -8 if e_dtype == torch.bfloat16 else 0.0  # one bf16 rounding
            err = np.abs(e - ref) / np.maximum(np.abs(ref), 1e-30)
            assert err.max() <= rel, f"e vs {name}: {err.max():.3g}"


def test_stats_epilogue_all_neg_inf_rows():
    """Rows whose logits are all -inf (a one-column block holding only their target, which is
    left out) keep m=-inf, l=0, write e=0 and alpha=0 (no NaN); a row whose running max is -inf
    picks up a finite block."""
    a = dict(scores=np.array([[1.0], [2.0], [0.5]], F32), inv_nx=np.ones(3, F32),
             inv_nw=np.ones(1, F32), labels=np.array([0, 0, -1], np.int64))
    m0 = np.array([-np.inf, -np.inf, 1.0], F32)
    l0 = np.array([0.0, 0.0, 2.0], F32)
    m, l, e, alpha = run_stats(a, m0, l0, 0, 4.0, torch.float32)
    assert np.isneginf(m[0]) and l[0] == 0 and e[0, 0] == 0 and alpha[0] == 0
    assert np.isneginf(m[1]) and l[1] == 0 and e[1, 0] == 0 and alpha[1] == 0
    assert m[2] == 2.0 and np.isclose(l[2], 2 * np.exp(-1.0) + 1.0, rtol=1e-6)
    assert not np.isnan(np.concatenate([m, l, e.ravel(), alpha])).any()


GRAD_CASES = [(1, 1, 0), (4, 33, 0), (33, 300, 500), (7, 513, 3)]


@pytest.mark.parametrize("B,cols,c0", GRAD_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["p_pw", "p", "pw"])
def test_grads_epilogue(B, cols, c0, out_dtype, need):
    rng = np.random.default_rng(B + cols + c0)
    scale = 16.0
    a = block_inputs(rng, B, cols, c0, scale)
    z = ref_z(a, c0, scale)
    lse = (z.max(1) + rng.uniform(0.5, 4, B)).astype(F32)  # >= the block's max, like a real lse
    row_coef = rng.uniform(-1, 1, B).astype(F32)
    row_coef[rng.random(B) < 0.3] = 0.0
    if B > 1:
        lse[row_coef == 0] = np.nan  # must not be read for those rows
    need_p, need_pw = need
    out = emu.run("epi_grads", dict(a, lse=lse, row_coef=row_coef),
                  dict(B=B, cols=cols, c0=c0, scale=scale, out_dtype=OUT_CODES[out_dtype],
                       need_p=need_p, need_pw=need_pw), seeds=SEEDS)
    t = tensors(a)
    tp = torch.empty(B, cols, dtype=out_dtype) if need_p else None
    tpw = torch.empty(B, cols, dtype=out_dtype) if need_pw else None
    twin.grads_epilogue(t["scores"], t["inv_nx"], t["inv_nw"], t["labels"], c0,
                        scale, torch.from_numpy(lse), torch.from_numpy(row_coef), tp, tpw)
    live = row_coef != 0
    e = np.zeros_like(z)
    e[live] = np.exp(z[live] - lse[live, None].astype(np.float64))
    refs = {"p": without_targets(row_coef[:, None] * e, a, c0),
            "pw": without_targets(e * a["inv_nw"].astype(np.float64)[None, :], a, c0)}
    # vs the twin (the same fp32 z): expf ulps; vs float64 also z's fp32 rounding (|z| <= 16:
    # a few 1e-6 relative after exp); bf16 outputs: one bf16 rounding more.
    bf16 = 2.0 ** -8 if out_dtype == torch.bfloat16 else 0.0
    for name, flag, tw in (("p", need_p, tp), ("pw", need_pw, tpw)):
        if not flag:
            assert out[name] == b""
            continue
        got = decode(out[name], out_dtype, (B, cols))
        assert (got[~live] == 0).all(), f"{name}: rows with row_coef 0 must be 0"
        assert (got[target_cells(a, c0, cols)] == 0).all(), f"{name}: target cells must hold 0"
        for ref_name, ref, rel in (("twin", tw.float().numpy(), 1e-6), ("float64", refs[name], 1e-5)):
            err = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)
            assert err.max() <= rel + bf16, f"{name} vs {ref_name}: {err.max():.3g}"


def test_launchers_refuse_bad_arguments():
    rng = np.random.default_rng(0)
    a = block_inputs(rng, 2, 5, 0)
    m0, l0 = np.full(2, -np.inf, F32), np.zeros(2, F32)
    with pytest.raises(emu.EmulatorError) as e:  # float16 blocks are not offered
        emu.run("epi_stats", dict(a, m=m0, l=l0), dict(B=2, cols=5, c0=0, scale=1.0, with_e=1,
                                                       out_dtype=1))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and "e_dtype" in e.value.stderr
    lse, rc = np.zeros(2, F32), np.ones(2, F32)
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("epi_grads", dict(a, lse=lse, row_coef=rc),
                dict(B=2, cols=5, c0=0, scale=1.0, out_dtype=0, need_p=0, need_pw=0))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and "neither" in e.value.stderr


# ---- the chunk loop with the emulated kernels as its epilogue ---------------------------------

def _emulated_stats(scores, inv_nx, inv_nw, labels, c0, scale, m, l, e_out=None,
                    alpha_out=None):
    a = {k: v.numpy() for k, v in dict(scores=scores, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels).items()}
    rm, rl, re, ra = run_stats(a, m.numpy().copy(), l.numpy().copy(), c0, scale,
                               e_out.dtype if e_out is not None else None)
    m.copy_(torch.from_numpy(rm.copy()))
    l.copy_(torch.from_numpy(rl.copy()))
    if e_out is not None:
        e_out.copy_(torch.from_numpy(re.copy()))  # bf16 values round-trip exactly
        alpha_out.copy_(torch.from_numpy(ra.copy()))


def _emulated_grads(scores, inv_nx, inv_nw, labels, c0, scale, lse, row_coef,
                    p_out=None, pw_out=None):
    B, cols = scores.shape
    out_dtype = (p_out if p_out is not None else pw_out).dtype
    a = {k: v.numpy() for k, v in dict(scores=scores, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels, lse=lse, row_coef=row_coef).items()}
    out = emu.run("epi_grads", a, dict(B=B, cols=cols, c0=c0, scale=scale,
                                       out_dtype=OUT_CODES[out_dtype], need_p=p_out is not None,
                                       need_pw=pw_out is not None), seeds=(1,))
    for name, t in (("p", p_out), ("pw", pw_out)):
        if t is not None:
            t.copy_(torch.from_numpy(decode(out[name], out_dtype, (B, cols)).copy()))


EMULATED = epi.Epilogue(_emulated_stats, _emulated_grads, "emulated")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_loop_with_emulated_kernels(dtype):
    """The provider's loop, the epilogue being the emulated CUDA kernels, matches the loop with the
    twin and the chunked torch provider (3 chunks, the last one partial, labels -1)."""
    g = torch.Generator().manual_seed(5)
    B, C, d, chunk, scale = 6, 70, 16, 32, 20.0
    x = torch.randn(B, d, generator=g).to(dtype)
    w = torch.randn(C, d, generator=g).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[1] = -1
    inv_nx, inv_nw = inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32)
    row_coef = torch.rand(B, generator=g)
    row_coef[2] = 0.0
    args = (x, w, inv_nx, inv_nw, labels)
    out = {}
    for name, ep in (("emulated", EMULATED), ("twin", epi.TORCH_EPILOGUE)):
        lse, pws = epi.softmax_stats(*args, scale, True, chunk, epilogue=ep)
        gx, gw = epi.softmax_grads(*args, lse, row_coef, scale, True, True, chunk, epilogue=ep)
        out[name] = (lse, pws, gx, gw)
    ref = margin_softmax_torch.softmax_stats(x.float(), w.float(), inv_nx, inv_nw, labels, scale,
                                             True, chunk)
    ref += margin_softmax_torch.softmax_grads(x.float(), w.float(), inv_nx, inv_nw, labels,
                                              out["twin"][0], row_coef, scale, True, True, chunk)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: e / p blocks and x_hat rounded to bf16
    for name, a, b, r in zip(("lse", "pws", "gx", "gw"), out["emulated"], out["twin"], ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6) or dtype == torch.bfloat16 and \
            torch.allclose(a, b, rtol=1e-2, atol=1e-3), name
        assert (a - r).abs().max() <= tol * r.abs().max().clamp_min(1.0), name
