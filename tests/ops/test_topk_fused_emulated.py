"""The fused tensor-core top-k search (csrc/cuda/topk_fused*, mma_common.cuh) on the CPU emulator,
against numpy. No GPU needed.

Each launch runs the library's launcher (topk_fused_search: the partial kernel, then the split
merge) under two thread-schedule seeds (bit-identical outputs required) with the shared-memory
race check and guard pages behind every buffer; an emulator error (race, deadlock, a read of a
cp.async stage not yet waited for, an out-of-bounds access) fails the test.

Two references:
- ``model_scores`` replays the emulated arithmetic exactly (mma_common.cuh sums the 16 exact
  bf16 products of each k16 step in double and rounds once to fp32; then v = acc * inv_nq *
  inv_ng in fp32), so the selection is checked bit for bit: the exact top-k of those fp32 scores
  merged with the running list (score descending, ties to the lower index, the list first;
  excluded and non-finite entries skipped; -0 as +0; padding (-inf, -1)).
- every selected chunk score is also within 1e-6 (relative to |q| |g| inv_nq inv_ng) of the
  float64 score of the exact bf16 values.
The emulated mma is checked against the PTX ISA's documented layouts, not against hardware (see
csrc/emulator/README.md); on a GPU the hardware's rounding inside an mma may differ by an ulp.
"""
from __future__ import annotations


import numpy as np
import pytest

import kernel_emulator as emu

pytestmark = pytest.mark.emulated

SEEDS = (1, 2)
F32, F64 = np.float32, np.float64
BN = 128  # chunk columns per tile (topk_fused_kernels.cuh)


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()


# ---- references --------------------------------------------------------------------------------

def bf16(x):
    """(bf16 bits for the kernel, their exact values as float64)."""
    bits, val = emu.encode(np.asarray(x, F32), "bfloat16")
    return bits, val.astype(F64)


def model_scores(qv, gv, inv_nq, inv_ng):
    """The emulator's fp32 scores: per k16 step acc = fp32(acc + sum of 16 exact products, summed
    in double in k order); then acc * inv_nq * inv_ng in fp32."""
    Q, d = qv.shape
    acc = np.zeros((Q, gv.shape[0]), F32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k0 in range(0, d, 16):
            s = acc.astype(F64)
            for kk in range(k0, min(k0 + 16, d)):
                s = s + np.outer(qv[:, kk], gv[:, kk])
            acc = s.astype(F32)
        v = acc
        if inv_nq is not None:
            v = v * inv_nq[:, None]
        if inv_ng is not None:
            v = v * inv_ng[None, :]
    return v.astype(F32)


def ref_lists(v, run_s, run_i, k, n0, exclude=False, self_col0=0):
    """topk_epilogue.h's contract on the fp32 scores v [Q, N]: (scores, indices, flag)."""
    Q, N = v.shape
    out_s = np.full((Q, k), -np.inf, F32)
    out_i = np.full((Q, k), -1, np.int64)
    flag = 0
    for r in range(Q):
        use = np.ones(N, bool)
        if exclude and 0 <= self_col0 + r < N:
            use[self_col0 + r] = False
        fin = np.isfinite(v[r])
        flag |= int((use & ~fin).any())
        ok = use & fin
        cs = v[r][ok]
        cs = np.where(cs == 0, F32(0), cs)  # -0 -> +0
        li = run_i[r] >= 0
        s = np.concatenate([run_s[r][li], cs]).astype(F32)
        i = np.concatenate([run_i[r][li], n0 + np.nonzero(ok)[0]])
        order = np.lexsort((i, -s.astype(F64)))[:k]  # list indices < n0: the list wins ties
        out_s[r, :len(order)] = s[order]
        out_i[r, :len(order)] = i[order]
    return out_s, out_i, flag


def empty_lists(Q, k):
    return np.full((Q, k), -np.inf, F32), np.full((Q, k), -1, np.int64)


def run_fused(q_bits, g_bits, k, run_s, run_i, n0=0, inv_nq=None, inv_ng=None, exclude=False,
              self_col0=0, splits=None, nonfinite=0, seeds=SEEDS, variant=None, **extra):
    Q, d = q_bits.shape
    N = g_bits.shape[0]
    p = dict(Q=Q, N=N, d=d, k=k, n0=n0, exclude=exclude, self_col0=self_col0, **extra)
    if splits is not None:
        p["splits"] = splits
    arrays = dict(q=q_bits, g=g_bits, inv_nq=inv_nq, inv_ng=inv_ng, run_s=run_s, run_i=run_i,
                  nonfinite=np.array([nonfinite], np.int32))
    out = emu.run("fused_topk", arrays, p, seeds=seeds, variant=variant)
    return (np.frombuffer(out["run_s"], F32).reshape(Q, k).copy(),
            np.frombuffer(out["run_i"], np.int64).reshape(Q, k).copy(),
            int(np.frombuffer(out["nonfinite"], np.int32)[0]))


def check(q, g, k, lists=None, n0=0, inv_nq=None, inv_ng=None, exclude=False, self_col0=0,
          splits=None, **kw):
    """Runs the kernel on float32 q, g (rounded to bf16) and asserts it equals the model bit for
    bit and the float64 scores within tolerance. Returns (scores, indices, flag)."""
    (qb, qv), (gb, gv) = bf16(q), bf16(g)
    Q, N = qv.shape[0], gv.shape[0]
    run_s, run_i = lists if lists is not None else empty_lists(Q, k)
    got_s, got_i, flag = run_fused(qb, gb, k, run_s, run_i, n0, inv_nq, inv_ng, exclude, self_col0,
                                   splits, **kw)
    v = model_scores(qv, gv, inv_nq, inv_ng)
    ref_s, ref_i, ref_flag = ref_lists(v, run_s, run_i, k, n0, exclude, self_col0)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_array_equal(got_s.view(np.uint32), ref_s.view(np.uint32))
    assert flag == ref_flag
    # The chunk's selected scores against float64 (exact bf16 products, inverse norms).
    r, c = np.nonzero(got_i >= n0)
    j = got_i[r, c] - n0
    fq = np.ones(Q) if inv_nq is None else inv_nq.astype(F64)
    fg = np.ones(N) if inv_ng is None else inv_ng.astype(F64)
    exact = np.einsum("ij,ij->i", qv[r], gv[j]) * fq[r] * fg[j]
    bound = np.linalg.norm(qv[r], axis=1) * np.linalg.norm(gv[j], axis=1) * np.abs(fq[r] * fg[j])
    err = np.abs(got_s[r, c].astype(F64) - exact)
    assert (err <= 1e-6 * np.maximum(np.abs(exact), bound) + 1e-30).all(), err.max(initial=0)
    return got_s, got_i, flag


def normal(rng, shape):
    return rng.standard_normal(shape).astype(F32)


def inv_norms(x):
    return (1 / np.linalg.norm(x.astype(F64), axis=1)).astype(F32)


# ---- shapes, k, paths ------------------------------------------------------------------------

# (Q, N, d, k, splits, norms): Q = 1 / N = 1; k < N, k == N, k > N (padding); k <= 32, <= 64 and
# > 64 (the three KMAX instantiations); d % 8 != 0 (plain-load path) and d % 16 != 0 (zero-filled
# chunks); several splits; two row tiles with a tail (Q = 130); a column tail.
CASES = [
    (1, 1, 8, 1, 1, "both"),
    (1, 7, 16, 5, 1, "none"),
    (3, 7, 40, 32, 1, "q"),            # k > N: padding
    (3, 128, 100, 128, 1, "g"),        # k == N, plain loads
    (3, 300, 16, 33, 3, "both"),
    (3, 1000, 128, 5, 5, "both"),
    (130, 300, 16, 128, 2, "both"),
    (130, 1000, 8, 32, 4, "none"),
    (3, 1000, 40, 128, 2, "g"),
    (1, 130, 100, 1, 1, "q"),          # plain loads, a one-column tail tile
    (3, 300, 100, 50, 2, "both"),      # 32 < k <= 64, plain loads
]


@pytest.mark.parametrize("Q,N,d,k,splits,norms", CASES)
def test_topk_matches_the_model(Q, N, d, k, splits, norms):
    rng = np.random.default_rng(Q * 7919 + N * 31 + d + k)
    q, g = normal(rng, (Q, d)), normal(rng, (N, d))
    inv_nq = inv_norms(q) if norms in ("q", "both") else None
    inv_ng = inv_norms(g) if norms in ("g", "both") else None
    s, i, flag = check(q, g, k, inv_nq=inv_nq, inv_ng=inv_ng, splits=splits)
    assert flag == 0 and (i[:, :min(k, N)] >= 0).all() and (i[:, N:] == -1).all()


def test_random_cases(seed):
    """Fresh random draws each run (the seed is printed): shapes, k, norms, quantized values
    (ties), exclude_self, running lists from an earlier chunk, NaN / inf, split counts."""
    rng = np.random.default_rng(seed)
    for _ in range(4):
        Q, N = int(rng.integers(1, 140)), int(rng.integers(1, 700))
        d, k = int(rng.choice([8, 13, 16, 40, 64])), int(rng.integers(1, 129))
        q, g = normal(rng, (Q, d)), normal(rng, (N, d))
        if rng.random() < 0.3:  # few distinct values: many exact ties
            q, g = np.round(q), np.round(g)
        if rng.random() < 0.2:
            (q if rng.random() < 0.5 else g)[0, 0] = rng.choice([np.nan, np.inf])
        inv_nq = inv_norms(q) if rng.random() < 0.5 else None
        inv_ng = inv_norms(g) if rng.random() < 0.5 else None
        lists, n0 = None, 0
        if rng.random() < 0.4:  # a running list from an earlier chunk, indices below n0
            n0 = int(rng.integers(k, k + 1000))
            run_s = np.sort(normal(rng, (Q, k)), axis=1)[:, ::-1].copy()
            run_i = np.stack([rng.permutation(n0)[:k] for _ in range(Q)]).astype(np.int64)
            cut = int(rng.integers(0, k + 1))
            run_s[:, cut:], run_i[:, cut:] = -np.inf, -1
            lists = (run_s, run_i)
        exclude = bool(rng.random() < 0.3)
        self_col0 = int(rng.integers(-5, N + 5))
        check(q, g, k, lists=lists, n0=n0, inv_nq=inv_nq, inv_ng=inv_ng, exclude=exclude,
              self_col0=self_col0, splits=int(rng.integers(1, 6)), seeds=(int(rng.integers(1, 99)),))


def test_same_result_for_every_split_count():
    """splits 1..5 and the default: bit-identical lists (an exact selection of the same
    scores)."""
    rng = np.random.default_rng(5)
    q, g = normal(rng, (3, 16)), normal(rng, (1000, 16))
    (qb, _), (gb, _) = bf16(q), bf16(g)
    runs = [run_fused(qb, gb, 33, *empty_lists(3, 33), splits=s, seeds=(1,))
            for s in (1, 2, 3, 4, 5, None)]
    for s, i, f in runs[1:]:
        assert np.array_equal(s.view(np.uint32), runs[0][0].view(np.uint32))
        assert np.array_equal(i, runs[0][1]) and f == runs[0][2]
    check(q, g, 33, splits=5)


# ---- contract details ------------------------------------------------------------------------

@pytest.mark.parametrize("self_col0", [5, 298, -2, 1000])
def test_exclude_self(self_col0):
    """Row r skips chunk column self_col0 + r: inside the chunk, partly outside (298: rows 2..
    fall past N = 300), entirely outside. Queries equal to their own gallery rows."""
    rng = np.random.default_rng(17)
    g = normal(rng, (300, 16))
    q = g[max(0, min(self_col0, 290)):][:4].copy()
    s, i, _ = check(q, g, 7, n0=50, inv_nq=inv_norms(q), inv_ng=inv_norms(g), exclude=True,
                    self_col0=self_col0, splits=2)
    for r in range(4):
        assert 50 + self_col0 + r not in i[r]


def test_nonfinite_flagged_never_selected():
    """A NaN in q (its row's scores are all NaN: the list keeps its entries) and a NaN in g (that
    column is NaN for every query): flag set, never selected. The flag is never cleared."""
    rng = np.random.default_rng(23)
    q, g = normal(rng, (3, 16)), normal(rng, (300, 16))
    q[1, 4] = np.nan
    g[7, 0] = np.nan
    lists = empty_lists(3, 5)
    lists[0][1, :2] = [9.0, 8.0]
    lists[1][1, :2] = [3, 4]
    s, i, flag = check(q, g, 5, lists=lists, n0=10, splits=2)
    assert flag == 1 and not (i == 17).any()
    assert list(i[1]) == [3, 4, -1, -1, -1]
    # Only the excluded column is NaN: no flag.
    s, i, flag = check(q[[0]], g, 5, n0=10, exclude=True, self_col0=7)
    assert flag == 0
    # Flag already set by an earlier chunk: stays set.
    _, _, flag = run_fused(*[bf16(x)[0] for x in (q[[0, 2]], g[:5])], 5, *empty_lists(2, 5),
                           nonfinite=1, seeds=(1,))
    assert flag == 1


def test_duplicated_gallery_rows_tie_to_the_lower_index():
    """Gallery rows repeated many times (within a tile, across tiles and splits): equal scores,
    the lower index first."""
    rng = np.random.default_rng(29)
    base = normal(rng, (6, 24))
    g = base[rng.integers(0, 6, 700)]
    q = normal(rng, (5, 24))
    s, i, _ = check(q, g, 40, inv_ng=inv_norms(g), splits=3)
    for r in range(5):
        for a, b in zip(range(39), range(1, 40)):
            assert s[r, a] > s[r, b] or (s[r, a] == s[r, b] and i[r, a] < i[r, b])


def test_signed_zeros_tie_by_index():
    """Zero gallery rows and a negative inverse norm give -0.0 and +0.0 scores: read as +0, they
    tie by index, and the list's zero entries come first."""
    rng = np.random.default_rng(31)
    g = normal(rng, (200, 16))
    g[rng.random(200) < 0.5] = 0.0
    q = -np.abs(normal(rng, (2, 16)))
    g = np.abs(g)  # every score <= 0: the zeros are the best
    inv_nq = np.array([-1.0, 1.0], F32)  # row 0: positive scores and -0.0 zeros
    lists = empty_lists(2, 40)
    lists[0][:, :1] = 0.0
    lists[1][:, :1] = 3
    s, i, _ = check(q, g, 40, lists=lists, n0=500, inv_nq=inv_nq)
    assert i[1, 0] == 3 and s[1, 0] == 0 and (s[1, 1:][i[1, 1:] >= 0] <= 0).all()
    assert not np.signbit(s[1][s[1] == 0]).any()


@pytest.mark.parametrize("k", [5, 64])
def test_running_lists_across_chunks(k):
    """Chunk A into empty lists, then chunk B (n0 = len(A)) into them; B repeats some rows of A,
    so list entries tie with chunk scores (the list wins); then a chunk of worse scores leaves
    the lists unchanged."""
    rng = np.random.default_rng(37 + k)
    q = normal(rng, (4, 32))
    a = normal(rng, (260, 32))
    s, i, _ = check(q, a, k)
    b = np.concatenate([normal(rng, (100, 32)), a[i[0, : min(k, 10)]], a[i[3, :3]]])
    s2, i2, _ = check(q, b, k, lists=(s, i), n0=260, splits=2)
    # Sorted by score, equal scores by index (so a list entry precedes its chunk twin).
    both_valid = (i2[:, :-1] >= 0) & (i2[:, 1:] >= 0)
    in_order = (s2[:, :-1] > s2[:, 1:]) | ((s2[:, :-1] == s2[:, 1:]) & (i2[:, :-1] < i2[:, 1:]))
    assert in_order[both_valid].all()
    if k == 64:  # row 0's 10 best of A are repeated in B: list entries and twins both kept
        ties = (s2[0, :-1] == s2[0, 1:]) & (i2[0, :-1] < 260) & (i2[0, 1:] >= 360)
        assert ties.sum() >= 5
    worse = -np.abs(normal(rng, (50, 32))) * 0.01
    check(q, worse, k, lists=(s2, i2), n0=1000)


@pytest.mark.parametrize("Q,k", [(3, 128), (130, 32), (2, 1)])
def test_increasing_scores_overflow_the_candidate_buffer(Q, k):
    """Worst case of the candidate buffer: scores increase along the gallery for every query, so
    every tile beats the whole kept list; each tile overflows the 32-entry buffers and the
    pending rounds must still give the exact result."""
    rng = np.random.default_rng(41)
    d, N = 16, 700
    u = np.abs(normal(rng, (1, d))) + 0.5
    g = u * np.linspace(0.01, 4.0, N, dtype=F32)[:, None]
    q = np.abs(normal(rng, (Q, d))) + 0.1
    s, i, _ = check(q, g, k, splits=1)
    assert (i[:, 0] >= N - 8).all()


# ---- negative controls -----------------------------------------------------------------------

def test_dropping_pending_scores_is_caught():
    """BCT_FAST_EMU_BREAK_TOPK_PENDING drops the scores that find the buffer full: the
    increasing-score case must then fail."""
    rng = np.random.default_rng(41)
    d, N = 16, 700
    u = np.abs(normal(rng, (1, d))) + 0.5
    g = u * np.linspace(0.01, 4.0, N, dtype=F32)[:, None]
    q = np.abs(normal(rng, (3, d))) + 0.1
    with pytest.raises(AssertionError):
        check(q, g, 128, splits=1, seeds=(1,), variant="topk_pending")


def test_broken_tie_order_is_caught():
    """BCT_FAST_EMU_BREAK_TIE_ORDER (ties to the higher index) fails the duplicates case."""
    rng = np.random.default_rng(29)
    g = normal(rng, (6, 24))[rng.integers(0, 6, 300)]
    q = normal(rng, (2, 24))
    with pytest.raises(AssertionError):
        check(q, g, 20, seeds=(1,), variant="tie_order")


# ---- arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("params,message", [
    (dict(d=0), "positive"),
    (dict(k=0), "k must be"),
    (dict(k=129), "k must be"),
    (dict(n0=-1), "n0"),
    (dict(splits=0), "splits"),
    (dict(null="q"), "q is a null"),
    (dict(null="g"), "g is a null"),
    (dict(null="workspace"), "workspace is a null"),
    (dict(null="run_s"), "run_s is a null"),
    (dict(null="nonfinite"), "nonfinite is a null"),
    (dict(ws_bytes=8), "workspace has 8 bytes"),
])
def test_refuses_bad_arguments(params, message):
    rng = np.random.default_rng(3)
    p = dict(Q=3, N=5, d=8, k=4, n0=0, exclude=0, self_col0=0, splits=1)
    p.update(params)
    d = max(p["d"], 1)
    q_bits, _ = bf16(normal(rng, (3, d)))
    g_bits, _ = bf16(normal(rng, (5, d)))
    if p["d"] == 0:
        q_bits, g_bits = q_bits[:, :0], g_bits[:, :0]
    kk = p["k"]
    arrays = dict(q=q_bits, g=g_bits, run_s=np.full((3, kk), -np.inf, F32),
                  run_i=np.full((3, kk), -1, np.int64), nonfinite=np.zeros(1, np.int32))
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("fused_topk", arrays, p, seeds=(1,))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and message in e.value.stderr


def test_more_splits_than_merge_threads():
    """129 splits of one tile each: the merge kernel reads the splits' first entries in groups of
    128 (its block size); scores increase along the gallery so every split has entries."""
    rng = np.random.default_rng(43)
    N = 129 * BN
    g = (np.abs(normal(rng, (1, 8))) + 0.5) * np.linspace(0.01, 4.0, N, dtype=F32)[:, None]
    q = np.abs(normal(rng, (1, 8))) + 0.1
    g[::7] *= -1  # and some splits' best entries interleave
    check(q, g, 3, splits=200, seeds=(1,))
