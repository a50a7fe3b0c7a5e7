"""The CUDA kernels' logic on the CPU (issue 21): csrc/cuda/*.cu compiled with g++ against the
emulator in csrc/emulator/ (fibers per CUDA thread, barrier/shuffle rendezvous with deadlock
detection, a shared-memory race check, guard pages behind every global buffer; see
kernel_emulator.py). No GPU needed.

Each case calls the library's own launcher (the entry points bct_fast/_native.py calls, with the
class/gallery split counts it would pick on an H100) under several thread-schedule seeds, which
must agree bit for bit, and checks the result: the margin sweeps against float64 numpy within
1e-5, the top-k search bit for bit against a reference with the kernel's fp32 arithmetic.
"""
from __future__ import annotations

import math
import re
import signal

import numpy as np
import pytest

import kernel_emulator as emu

pytestmark = pytest.mark.emulated

SEEDS = (1, 2, 3)
H100_SMS = 132
F32 = np.float32


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()


# ---- margin softmax: stats (with / without the accumulator) and grad_weight ------------------

def class_splits(B: int, C: int) -> int:
    """bct_fast._native._class_splits on an H100."""
    return int(max(1, min(math.ceil(4 * H100_SMS / math.ceil(B / 32)), math.ceil(C / 256), 1024)))


def margin_inputs(rng, B, C, d, dtype, scale=16.0):
    x, xv = emu.encode(rng.standard_normal((B, d)), dtype)
    w, wv = emu.encode(rng.standard_normal((C, d)), dtype)
    inv_nx = (1 / np.maximum(np.linalg.norm(xv.astype(np.float64), axis=1), 1e-12)).astype(F32)
    inv_nw = (1 / np.maximum(np.linalg.norm(wv.astype(np.float64), axis=1), 1e-12)).astype(F32)
    labels = rng.integers(0, C, B).astype(np.int64)
    labels[rng.random(B) < 0.2] = -1  # rows without a target column
    return dict(x=x, w=w, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels), xv, wv


def ref_logits(arrays, xv, wv, scale):
    """float64 z [B, C] with each row's target column left out (-inf), as both kernels do (the
    caller combines their results with the margin logit). A dot product
    beyond fp32's range is +-inf, as the kernel's fp32 one (test_margin_stats_all_neg_inf builds
    -inf logits that way)."""
    dot = xv.astype(np.float64) @ wv.astype(np.float64).T
    dot[np.abs(dot) > np.finfo(F32).max] *= np.inf
    z = scale * dot
    z *= arrays["inv_nx"].astype(np.float64)[:, None] * arrays["inv_nw"].astype(np.float64)[None, :]
    rows = np.nonzero(arrays["labels"] >= 0)[0]
    z[rows, arrays["labels"][rows]] = -np.inf
    return z


def ref_stats(z, what, splits, labels):
    """Per split: m, l over every column; acc leaves each row's target column out."""
    B, C = z.shape
    per = ((C + splits - 1) // splits + 31) // 32 * 32
    m = np.full((splits, B), -np.inf)
    l = np.zeros((splits, B))
    acc = np.zeros((splits, B, what.shape[1]))
    for s in range(splits):
        zs = z[:, s * per:min(C, (s + 1) * per)]
        if zs.shape[1] == 0:
            continue
        m[s] = zs.max(1)
        with np.errstate(invalid="ignore"):  # -inf - -inf in rows that are all -inf
            e = np.where(np.isneginf(m[s])[:, None], 0.0, np.exp(zs - m[s][:, None]))
        l[s] = e.sum(1)
        local = labels - s * per
        rows = np.nonzero((labels >= 0) & (local >= 0) & (local < zs.shape[1]))[0]
        e[rows, local[rows]] = 0.0
        acc[s] = e @ what[s * per:min(C, (s + 1) * per)]
    return m, l, acc


def assert_close(got, ref, tol, what):
    """|got - ref| <= tol * max(1, |ref|) elementwise, same infinities, no NaN."""
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), f"{what}: NaN in the kernel's output"
    assert np.array_equal(np.isinf(got), np.isinf(ref)) and np.array_equal(
        got[np.isinf(got)], ref[np.isinf(ref)]), f"{what}: infinities differ"
    fin = np.isfinite(ref)
    err = np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin]))
    assert err.size == 0 or err.max() <= tol, f"{what}: max scaled error {err.max():.3g} > {tol}"


def run_stats(arrays, B, C, d, dtype, scale, splits, with_acc):
    out = emu.run("stats", arrays, dict(B=B, C=C, d=d, dtype=emu.DTYPE_CODES[dtype], scale=scale,
                                        splits=splits, with_acc=with_acc), seeds=SEEDS)
    m = np.frombuffer(out["m"], F32).reshape(splits, B)
    l = np.frombuffer(out["l"], F32).reshape(splits, B)
    acc = np.frombuffer(out["acc"], F32).reshape(splits, B, d) if with_acc else None
    return m, l, acc


def check_stats(arrays, xv, wv, B, C, d, dtype, scale, splits):
    z = ref_logits(arrays, xv, wv, scale)
    what = wv.astype(np.float64) * arrays["inv_nw"].astype(np.float64)[:, None]
    rm, rl, racc = ref_stats(z, what, splits, arrays["labels"])
    for with_acc in (False, True):
        m, l, acc = run_stats(arrays, B, C, d, dtype, scale, splits, with_acc)
        assert_close(m, rm, 1e-5, f"m (with_acc={with_acc})")
        assert_close(l, rl, 1e-5, f"l (with_acc={with_acc})")
        if with_acc:
            assert_close(acc, racc, 1e-5, "acc")
    return z


def check_grad_weight(arrays, xv, z, B, C, d, dtype, scale, rng):
    zmax = np.max(np.where(np.isneginf(z), -1e300, z), axis=1)
    lse = (zmax + np.log(np.exp(z - zmax[:, None]).sum(1))).astype(F32)
    row_coef = rng.uniform(-1, 1, B).astype(F32)
    row_coef[rng.random(B) < 0.25] = 0.0  # skipped rows
    if B > 1:
        lse[row_coef == 0] = np.nan  # must not be read for skipped rows
    args = dict(arrays, lse=lse, row_coef=row_coef)
    out = emu.run("grad_weight", args, dict(B=B, C=C, d=d, dtype=emu.DTYPE_CODES[dtype],
                                            scale=scale), seeds=SEEDS)
    gw = np.frombuffer(out["gw"], F32).reshape(C, d)
    live = row_coef != 0
    p = np.zeros((B, C))
    p[live] = row_coef[live, None] * np.exp(z[live] - lse[live, None].astype(np.float64))
    rows = np.nonzero(arrays["labels"] >= 0)[0]
    p[rows, arrays["labels"][rows]] = 0.0  # the target column is left out
    xhat = xv.astype(np.float64) * arrays["inv_nx"].astype(np.float64)[:, None]
    assert_close(gw, p.T @ xhat, 1e-5, "grad_weight")


MARGIN_SHAPES = [(1, 1, 1), (3, 33, 31), (33, 300, 65),  # the GPU sanitizer set
                 (1, 1000, 64), (37, 611, 128), (64, 520, 129),  # GPU shapes, fewer classes
                 (300, 257, 96)]


@pytest.mark.parametrize("B,C,d", MARGIN_SHAPES)
def test_margin_kernels(B, C, d):
    rng = np.random.default_rng(B * 1000 + C + d)
    scale = 16.0
    arrays, xv, wv = margin_inputs(rng, B, C, d, "float32", scale)
    z = check_stats(arrays, xv, wv, B, C, d, "float32", scale, class_splits(B, C))
    check_grad_weight(arrays, xv, z, B, C, d, "float32", scale, rng)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_margin_kernels_low_precision(dtype):
    B, C, d = 34, 97, 40
    rng = np.random.default_rng(7)
    arrays, xv, wv = margin_inputs(rng, B, C, d, dtype)
    z = check_stats(arrays, xv, wv, B, C, d, dtype, 16.0, 2)
    check_grad_weight(arrays, xv, z, B, C, d, dtype, 16.0, rng)


@pytest.mark.parametrize("splits", [3, 5])
def test_margin_stats_empty_class_splits(splits):
    """C=40 in 3 or 5 splits of 32 classes: the last splits are empty (m=-inf, l=0, acc=0)."""
    B, C, d = 5, 40, 16
    rng = np.random.default_rng(splits)
    arrays, xv, wv = margin_inputs(rng, B, C, d, "float32")
    check_stats(arrays, xv, wv, B, C, d, "float32", 16.0, splits)


def test_margin_kernels_wide_rows():
    """d=1800: the fp32 accumulators of 32 rows/classes no longer fit, tiles shrink to 16."""
    B, C, d = 20, 40, 1800
    rng = np.random.default_rng(3)
    arrays, xv, wv = margin_inputs(rng, B, C, d, "float32")
    z = check_stats(arrays, xv, wv, B, C, d, "float32", 16.0, 1)
    check_grad_weight(arrays, xv, z, B, C, d, "float32", 16.0, rng)


def test_margin_stats_all_neg_inf():
    """Rows whose logits are all -inf (in a tile, in a split, everywhere) give m=-inf, l=0,
    acc=0 and no NaN; a first tile of -inf followed by finite tiles must not poison the row."""
    B, C, d = 6, 70, 8
    rng = np.random.default_rng(11)
    arrays, xv, wv = margin_inputs(rng, B, C, d, "float32")
    # Classes 0..31 (the first tile): w = -1e20 against x = +1e20 overflows every dot to -inf.
    x = np.abs(rng.standard_normal((B, d))).astype(F32) * F32(1e20)
    w = rng.standard_normal((C, d)).astype(F32)
    w[:32] = -1e20
    arrays["x"], arrays["w"] = x, w
    arrays["inv_nx"] = (1 / np.linalg.norm(x.astype(np.float64), axis=1)).astype(F32)
    arrays["inv_nw"] = (1 / np.linalg.norm(w.astype(np.float64), axis=1)).astype(F32)
    arrays["labels"] = np.array([40, -1, 5, 69, -1, 33], np.int64)
    # Splits of 32: split 0 is -inf for every row, split 1 holds classes 32..63, split 2 64..69.
    check_stats(arrays, x, w, B, C, d, "float32", 16.0, 3)

    # C=1 whose only class is each row's target (left out): the whole row is -inf.
    arrays1, xv1, wv1 = margin_inputs(rng, 2, 1, 8, "float32")
    arrays1["labels"] = np.array([0, 0], np.int64)
    check_stats(arrays1, xv1, wv1, 2, 1, 8, "float32", 16.0, 1)


def test_margin_launcher_refuses_oversized_rows():
    """d too large for even a 1-row accumulator: the launcher returns an error, no launch."""
    B, C, d = 1, 1, 60000
    rng = np.random.default_rng(0)
    arrays, _, _ = margin_inputs(rng, B, C, d, "float32")
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("stats", arrays, dict(B=B, C=C, d=d, dtype=0, scale=1.0, splits=1, with_acc=1))
    assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR and "embedding dim too large" in e.value.stderr


# ---- cosine top-k ---------------------------------------------------------------------------

def topk_config(k):
    kcap = max(64, 1 << (k - 1).bit_length())
    return kcap, {64: 32, 128: 32, 256: 32, 512: 16, 1024: 8, 2048: 4}.get(kcap, 2)


def gallery_splits(Q, N, k):
    """bct_fast._native._gallery_splits on an H100."""
    _, qt = topk_config(k)
    by_occupancy = math.ceil(4 * H100_SMS / math.ceil(Q / qt))
    by_rows = max(1, N // max(4 * k, 256))
    by_memory = max(1, (256 << 20) // max(1, Q * k * 12))
    return int(max(1, min(by_occupancy, by_rows, by_memory, 1024)))


def fma32(a, b, c):
    """Correctly rounded fp32 fused multiply-add of float32 arrays (fmaf), vectorized."""
    p = a.astype(np.float64) * b.astype(np.float64)  # exact
    c = c.astype(np.float64)
    s = p + c
    with np.errstate(invalid="ignore"):  # inf / NaN inputs: err is NaN and unused
        bb = s - p
        err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly (TwoSum)
    # Rounding s to fp32 is right unless s sits exactly halfway between two floats and the
    # discarded err decides the direction: nudge s one float64 ulp towards the exact value.
    r = s.astype(F32)
    other = np.nextafter(r, np.where(s > r, F32(np.inf), F32(-np.inf)))
    halfway = (s != r) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2) & (err != 0)
    s = np.where(halfway, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def kernel_scores(qv, gv, inv_nq, inv_ng):
    """The kernel's fp32 scores: fmaf over the depth in order, then * inv_nq, then * inv_ng."""
    acc = np.zeros((qv.shape[0], gv.shape[0]), F32)
    for c in range(qv.shape[1]):
        acc = fma32(np.broadcast_to(qv[:, c:c + 1], acc.shape),
                    np.broadcast_to(gv[None, :, c], acc.shape), acc)
    with np.errstate(invalid="ignore", over="ignore"):
        if inv_nq is not None:
            acc = acc * inv_nq[:, None]
        if inv_ng is not None:
            acc = acc * inv_ng[None, :]
    return acc


def ref_topk(scores, k, splits, exclude, offset):
    """Per split: (score desc, index asc) over finite, non-excluded rows; (-inf, -1) padding."""
    Q, N = scores.shape
    per = ((N + splits - 1) // splits + 63) // 64 * 64
    out_s = np.full((splits, Q, k), -np.inf, F32)
    out_i = np.full((splits, Q, k), -1, np.int64)
    flag = 0
    for s in range(splits):
        lo, hi = min(N, s * per), min(N, (s + 1) * per)
        for r in range(Q):
            cols = np.arange(lo, hi)
            if exclude:
                cols = cols[cols != r + offset]
            v = scores[r, cols]
            fin = np.isfinite(v)
            flag |= int(not fin.all())
            cols, v = cols[fin], v[fin]
            order = np.lexsort((cols, -v))[:k]
            out_s[s, r, :len(order)] = v[order]
            out_i[s, r, :len(order)] = cols[order]
    return out_s, out_i, flag


def check_topk(q, g, k, *, q_dtype="float32", g_dtype=None, normalize=True, splits=None,
               exclude=False, offset=0, expect_flag=None):
    g_dtype = g_dtype or q_dtype
    Q, d = q.shape
    N = g.shape[0]
    qk, qv = emu.encode(q, q_dtype)
    gk, gv = emu.encode(g, g_dtype)
    inv_nq = inv_ng = None
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_nq = (1 / np.linalg.norm(qv.astype(np.float64), axis=1)).astype(F32)
            inv_ng = (1 / np.linalg.norm(gv.astype(np.float64), axis=1)).astype(F32)
    S = splits or gallery_splits(Q, N, k)
    out = emu.run("topk", dict(q=qk, g=gk, inv_nq=inv_nq, inv_ng=inv_ng),
                  dict(Q=Q, N=N, d=d, q_dtype=emu.DTYPE_CODES[q_dtype],
                       g_dtype=emu.DTYPE_CODES[g_dtype], k=k, splits=S, exclude=exclude,
                       exclude_offset=offset), seeds=SEEDS)
    s = np.frombuffer(out["scores"], F32).reshape(S, Q, k)
    i = np.frombuffer(out["index"], np.int64).reshape(S, Q, k)
    flag = int(np.frombuffer(out["nonfinite"], np.int32)[0])
    rs, ri, rflag = ref_topk(kernel_scores(qv, gv, inv_nq, inv_ng), k, S, exclude, offset)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s.view(np.uint32), rs.view(np.uint32))  # bit for bit
    assert flag == rflag
    if expect_flag is not None:
        assert flag == expect_flag
    return S


@pytest.mark.parametrize("Q,N,d,k", [(1, 1, 1, 1), (3, 70, 33, 70), (5, 300, 17, 65),
                                     (2, 600, 8, 300),  # the GPU sanitizer set
                                     (1, 1500, 96, 100), (33, 1031, 20, 1031), (70, 700, 16, 65),
                                     (5, 4500, 64, 4096)])
def test_topk_gpu_shapes(Q, N, d, k):
    rng = np.random.default_rng(Q + N + d + k)
    check_topk(rng.standard_normal((Q, d)), rng.standard_normal((N, d)), k)


TOPK_DTYPES = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
               ("float32", "float16"), ("float32", "bfloat16")]


@pytest.mark.parametrize("q_dtype,g_dtype", TOPK_DTYPES)
@pytest.mark.parametrize("k", [1, 64, 128, 200, 512, 1024, 2048, 4096])
def test_topk_every_instantiation(k, q_dtype, g_dtype):
    """Each topk_kernel<TQ, TG, KCAP, QT> that dispatch_k launches, on small integers (exact in
    every dtype) full of exact ties."""
    rng = np.random.default_rng(k)
    Q = topk_config(k)[1] + 1  # two query blocks, the second one nearly empty
    N = max(k + 37, 300)
    q = rng.integers(-2, 3, (Q, 3)).astype(F32)
    g = rng.integers(-2, 3, (N, 3)).astype(F32)
    check_topk(q, g, k, q_dtype=q_dtype, g_dtype=g_dtype, normalize=False, splits=1)
    if k <= 512 and q_dtype == g_dtype == "float32":
        check_topk(q, g, k, normalize=True, splits=3)


@pytest.mark.parametrize("q0,n0", [(0, 0), (100, 60), (60, 100), (0, 150)])
def test_topk_exclude_self(q0, n0):
    """Leave-one-out on a chunk: query r is gallery row q0 + r, the chunk starts at row n0, so
    the excluded column is r + (q0 - n0) (negative, zero or positive offsets; some out of range)."""
    rng = np.random.default_rng(q0 + n0)
    full = rng.integers(-2, 3, (300, 4)).astype(F32)
    q, g = full[q0:q0 + 40], full[n0:n0 + 120]
    for k in (1, 50, 119):
        check_topk(q, g, k, normalize=False, splits=2, exclude=True, offset=q0 - n0)


@pytest.mark.parametrize("splits", [1, 2, 5, 9])
def test_topk_gallery_splits(splits):
    """Several splits, including empty ones (9 splits of 64 rows for 300 rows) and splits with
    fewer rows than k (unfilled slots hold (-inf, -1))."""
    rng = np.random.default_rng(splits)
    check_topk(rng.standard_normal((5, 24)), rng.standard_normal((300, 24)), 70, splits=splits)


@pytest.mark.parametrize("q_dtype,g_dtype", [("float16", "float16"), ("bfloat16", "bfloat16"),
                                             ("float32", "float16"), ("float32", "bfloat16")])
def test_topk_low_precision(q_dtype, g_dtype):
    rng = np.random.default_rng(5)
    check_topk(rng.standard_normal((9, 40)), rng.standard_normal((700, 40)), 100,
               q_dtype=q_dtype, g_dtype=g_dtype)


def test_topk_nonfinite_flag():
    rng = np.random.default_rng(9)
    q, g = rng.standard_normal((4, 16)), rng.standard_normal((200, 16))
    check_topk(q, g, 10, expect_flag=0)
    g[17, 3] = np.nan
    g[150, 0] = np.inf
    check_topk(q, g, 10, normalize=False, expect_flag=1)
    check_topk(q, g, 10, normalize=True, expect_flag=1)  # inf / inf norm = NaN too


# ---- the harness catches broken kernels ---------------------------------------------------

def _margin_case():
    rng = np.random.default_rng(1)
    B, C, d = 5, 40, 40  # B, C not multiples of 32; d spans two depth stages
    arrays, _, _ = margin_inputs(rng, B, C, d, "float32")
    return arrays, dict(B=B, C=C, d=d, dtype=0, scale=16.0, splits=1, with_acc=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_harness_catches_missing_barrier(seed):
    """dot_tile without the barrier after its products: the next depth stage's loads (d=40 has
    two) overwrite tiles that other threads still read, a race on xs / ws whatever the order."""
    arrays, params = _margin_case()
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("stats", arrays, params, seeds=(seed,), variant="missing_barrier")
    err = e.value.stderr
    assert e.value.returncode == emu.EXIT_EMULATOR_ERROR, err
    assert re.search(r"stats_kernel<float, true>, block \(0,0,0\): shared-memory race on static "
                     r"smem '[\w:<>, ]*stats_kernel<float, true>::(xs|ws)'", err), err


def test_harness_catches_tail_off_by_one():
    """load() reading one row past the end of x / w: the guard page behind the buffer faults."""
    arrays, params = _margin_case()
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("stats", arrays, params, variant="tail_off_by_one")
    assert e.value.returncode == -signal.SIGSEGV, e.value.stderr
    # The correct build runs the same case cleanly.
    emu.run("stats", arrays, params)


# Each check of the harness on a tiny kernel built to trip it (csrc/emulator/selftest_emu.cpp).
SELFTEST_FAILURES = {
    "deadlock": "deadlock: 64 live threads, 48 wait at __syncthreads; thread 32 in __syncwarp",
    "divergent_barrier": "divergent __syncthreads",
    # Which message depends on whether the lane exits before or after the shuffle starts.
    "shuffle_exited_lane": r"naming lane \d+, which has exited|exited while lane \d+ of its warp "
                           r"waits for it in __shfl_xor_sync",
    "write_after_read": "shared-memory race",
    "uninitialised_read": "which no thread of this block has written",
}


@pytest.mark.parametrize("case", sorted(SELFTEST_FAILURES))
def test_harness_selftest_failures(case):
    with pytest.raises(emu.EmulatorError) as e:
        emu.run("selftest", {}, dict(case=case), seeds=SEEDS)
    assert e.value.returncode == emu.EXIT_EMULATOR_ERROR, e.value.stderr
    assert re.search(SELFTEST_FAILURES[case], e.value.stderr) and case in e.value.stderr, \
        e.value.stderr


def test_harness_selftest_warp_sync():
    """A __syncwarp orders lane 0's smem write before lane 5's read; without it, a race (or a read
    of a word not written yet, when lane 5 happens to run first)."""
    out = emu.run("selftest", {}, dict(case="warp_sync_ok"), seeds=SEEDS)
    assert np.frombuffer(out["out"], np.int32)[0] == 42
    for seed in SEEDS:
        with pytest.raises(emu.EmulatorError) as e:
            emu.run("selftest", {}, dict(case="warp_sync_missing"), seeds=(seed,))
        assert ("shared-memory race" in e.value.stderr
                or "which no thread of this block has written" in e.value.stderr), e.value.stderr


def test_harness_selftest_correct_kernels():
    out = emu.run("selftest", {}, dict(case="broadcast_and_atomics"), seeds=SEEDS)
    assert (np.frombuffer(out["out"], np.int32) == 7 * 64).all()
    out = emu.run("selftest", {}, dict(case="dynamic_smem_256"), seeds=SEEDS)
    assert (np.frombuffer(out["out"], np.int32) == (np.arange(128) + 1) % 64).all()


def test_harness_selftest_dynamic_smem_limits():
    """More than 48 KiB of dynamic smem needs the opt-in, and at most 227 KiB with it."""
    emu.run("selftest", {}, dict(case=f"dynamic_smem_{100 * 1024}_optin"))
    for case in (f"dynamic_smem_{48 * 1024 + 4}", f"dynamic_smem_{228 * 1024}_optin"):
        with pytest.raises(emu.EmulatorError) as e:
            emu.run("selftest", {}, dict(case=case))
        assert e.value.returncode == emu.EXIT_LAUNCHER_ERROR, e.value.stderr
        assert "dynamic smem" in e.value.stderr, e.value.stderr


def test_shim_low_precision_conversions():
    """__float2half / __float2bfloat16 round to nearest even like CUDA (numpy's float16 and the
    torch-compatible bf16 rounding as references); __half2float is exact (round trip)."""
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e-8, 2.0 ** -24,
               2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
               1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.4e38]
    x = np.concatenate([special, np.negative(special), rng.standard_normal(2000) * 10.0 **
                        rng.integers(-9, 6, 2000), rng.standard_normal(500) * 1e-6]).astype(F32)
    x = np.concatenate([x, np.array([np.nan], F32)])
    out = emu.run("convert", dict(x=x), dict(n=x.size))
    half = np.frombuffer(out["half"], np.uint16)
    with np.errstate(over="ignore"):
        ref_half = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(half[:-1], ref_half[:-1])
    assert np.isnan(half[-1:].view(np.float16)).all()
    bf = np.frombuffer(out["bf16"], np.uint16)
    np.testing.assert_array_equal(bf, emu.bf16_bits(x))
