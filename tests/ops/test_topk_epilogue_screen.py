"""The screened mode of the epilogue provider (bct_fast.ops.topk_epilogue, ``screen=True``): bf16
screen + bound + float64 rescoring must return the top-k of the float64 cosines (ties to the
lower index), bit for bit in the indices, scores = the float64 scores rounded to fp32. On the CPU
through the PyTorch twin of the selection kernel; marked cuda: the real kernels on a GPU.

The reference is independent of the module: a float64 matmul of float64-normalized rows, and a
stable sort on -score (equal scores keep index order)."""
from __future__ import annotations

import math

import pytest
import torch

from bct_fast.ops import topk_epilogue as tke

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("topk_epilogue",)


def reference(q, g, k, normalize=True, exclude_self=False):
    q64, g64 = q.double(), g.double()
    if normalize:
        q64 = torch.nn.functional.normalize(q64, dim=1, eps=1e-300)
        g64 = torch.nn.functional.normalize(g64, dim=1, eps=1e-300)
    s = q64 @ g64.T
    if exclude_self:
        s[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = -math.inf
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return s.gather(1, order).float(), order


def screened(q, g, k, **kw):
    kw.setdefault("selector", tke.TORCH_SELECTOR if q.device.type == "cpu" else tke.CUDA_SELECTOR)
    return tke.cosine_topk_epilogue(q, g, k, screen=True, **kw)


def assert_equal(got, ref):
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert torch.equal(got[1].cpu(), ref[1].cpu()), (got[1] != ref[1]).any(1).nonzero()[:5, 0]
    assert torch.equal(got[0].cpu(), ref[0].cpu()), (got[0].cpu() - ref[0].cpu()).abs().max()


# (Q, N, d, k, chunk): Q = 1, k = 1, k = N, N not a multiple of the chunk, d = 3 / 130 / 512.
CASES = [(1, 257, 3, 5, 64), (37, 1000, 130, 1, 128), (20, 777, 512, 10, 100), (9, 300, 8, 300, 64),
         (5, 1001, 33, 500, None), (64, 530, 130, 100, 96), (3, 4500, 3, 50, 1000)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("Q,N,d,k,chunk", CASES)
def test_random_equals_float64_reference(Q, N, d, k, chunk, normalize):
    gen = torch.Generator().manual_seed(Q * 1000 + N + d + k)
    q, g = torch.randn(Q, d, generator=gen), torch.randn(N, d, generator=gen) * 3
    assert_equal(screened(q, g, k, normalize=normalize, chunk_size=chunk), reference(q, g, k, normalize))
    assert tke.screen_stats["queries"] == Q


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [16, 64, 1000])
def test_exclude_self(normalize, chunk):
    gen = torch.Generator().manual_seed(chunk)
    g = torch.randn(150, 12, generator=gen)
    for k in (1, 10, 149):
        got = screened(g[:60].clone(), g, k, normalize=normalize, exclude_self=True, chunk_size=chunk)
        assert_equal(got, reference(g[:60], g, k, normalize, exclude_self=True))
        assert not (got[1] == torch.arange(60)[:, None]).any()


def near_tie_data(d=256, seed=1, spread=0.01):
    """Clusters of rows around 6 directions, cosines within ~1e-4 of each other (below the bf16
    screen's resolution), among random rows; queries near the cluster centres."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(6, d, generator=gen)
    cluster = b[torch.arange(60) % 6] + spread * torch.randn(60, d, generator=gen)
    g = torch.cat([torch.randn(500, d, generator=gen), cluster])
    return b + spread * torch.randn(6, d, generator=gen), g


@pytest.mark.parametrize("normalize", [True, False])
def test_near_ties_below_bf16_resolution(normalize):
    q, g = near_tie_data()
    for k in (1, 5, 10):
        assert_equal(screened(q, g, k, normalize=normalize, chunk_size=100), reference(q, g, k, normalize))
        assert tke.screen_stats["screened"] == 6  # the bf16 window held every near-tie


def test_near_ties_below_fp32_resolution():
    """Cosines 1e-9 apart (fp32 scores tie or misorder them): float64 ranks them."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 64, generator=gen)
    g = base.repeat(40, 1)
    g[torch.arange(40), torch.arange(40) % 64] += torch.linspace(1e-6, 4e-5, 40)  # distinct rows
    g = torch.cat([torch.randn(300, 64, generator=gen), g])
    q = base.clone()
    ref = reference(q, g, 20)
    assert_equal(screened(q, g, 20, chunk_size=64), ref)


@pytest.mark.parametrize("normalize", [True, False])
def test_duplicates_overflow_to_the_exact_passes(normalize):
    """Exact duplicates: a window of 300 equal scores overflows the bf16 list (float64-GEMM pass);
    2500 overflow that one too (float64 scan). Ties go to the lower index."""
    gen = torch.Generator().manual_seed(3)
    for dups, which in ((300, "f64_gemm"), (2500, "f64_scan")):
        g = torch.randn(3000, 40, generator=gen)
        g[torch.randperm(3000, generator=gen)[:dups]] = g[7].clone()
        q = torch.cat([g[7:8] + 1e-3 * torch.randn(1, 40, generator=gen), torch.randn(4, 40, generator=gen)])
        for k in (5, 40):
            assert_equal(screened(q, g, k, normalize=normalize, chunk_size=512), reference(q, g, k, normalize))
            assert tke.screen_stats[which] >= 1, tke.screen_stats


def test_exclude_self_in_the_exact_passes():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(2000, 16, generator=gen)
    g[1500:] = g[3]  # queries 0..9 include row 3: a duplicate-heavy window
    got = screened(g[:10].clone(), g, 20, exclude_self=True, chunk_size=256)
    assert_equal(got, reference(g[:10], g, 20, exclude_self=True))
    assert tke.screen_stats["f64_scan"] >= 1 or tke.screen_stats["f64_gemm"] >= 1


def test_zero_rows():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(400, 24, generator=gen)
    g[::13] = 0.0
    q = torch.randn(6, 24, generator=gen)
    q[2] = 0.0
    for k in (1, 30, 400):
        assert_equal(screened(q, g, k, chunk_size=64), reference(q, g, k))
    got = screened(g[:20].clone(), g, 5, exclude_self=True, chunk_size=64)  # row 0 is zero: 1..5
    assert_equal(got, reference(g[:20], g, 5, exclude_self=True))
    assert tke.screen_stats["zero"] == 2


def test_half_precision_inputs_are_upcast():
    gen = torch.Generator().manual_seed(6)
    q, g = torch.randn(8, 48, generator=gen).bfloat16(), torch.randn(600, 48, generator=gen).half()
    assert_equal(screened(q, g, 12, chunk_size=128), reference(q.float(), g.float(), 12))


def test_negative_control_a_smaller_bound_gives_wrong_answers(monkeypatch):
    """With the bound scaled to 0 the window keeps only the screen's own top-k: wrong on near-ties.
    Proves the tests above can fail."""
    q, g = near_tie_data()
    ref = reference(q, g, 5)
    monkeypatch.setattr(tke, "_EPS_SCALE", 0.0)
    got = screened(q, g, 5, chunk_size=100)
    assert not torch.equal(got[1], ref[1])


def test_the_bound_holds_on_the_screened_scores():
    """|S - cosine64| <= screen_eps on random unit-ish rows, and the bound is not vacuous."""
    gen = torch.Generator().manual_seed(7)
    for d in (3, 130, 512):
        q, g = torch.randn(16, d, generator=gen), torch.randn(2000, d, generator=gen) * 5
        inv = tke.inv_row_norms(g)
        h = g * inv[:, None]
        h16 = h.bfloat16()
        q64 = q.double()
        nq = torch.linalg.vector_norm(q64, dim=1)
        qh = q64 / nq[:, None]
        q16 = qh.bfloat16()
        S = (q16.float() @ h16.float().T).double()
        c64 = tke.cosine64(q, g)
        dh = float(torch.linalg.vector_norm(h - h16.float(), dim=1).max())
        eps = tke.screen_eps(torch.linalg.vector_norm(q16.double() - qh, dim=1),
                             torch.linalg.vector_norm(q16.double(), dim=1), nq, dh, 0.0, d, True)
        err = (S - c64).abs().amax(1)
        assert (err <= eps).all() and float(eps.max()) < 0.02


def test_cosine64_fixed_order_and_accuracy():
    """Same bits for every batch shape (shared vs per-query rows, subsets); within the bound of
    the exact cosine (math.fsum of the exact products, correctly rounded)."""
    gen = torch.Generator().manual_seed(8)
    q, g = torch.randn(5, 130, generator=gen), torch.randn(40, 130, generator=gen) * 1e3
    full = tke.cosine64(q, g)
    per_query = tke.cosine64(q[1:3], g[None, 10:20].expand(2, -1, -1))
    assert torch.equal(full[1:3, 10:20], per_query)
    e64 = (2 * 8 + 5) * 2.0 ** -53 * 1.01
    for i in range(5):
        for j in range(0, 40, 7):
            a, b = q[i].double().tolist(), g[j].double().tolist()
            dot = math.fsum(x * y for x, y in zip(a, b))
            exact = dot / math.sqrt(math.fsum(x * x for x in a)) / math.sqrt(math.fsum(y * y for y in b))
            assert abs(float(full[i, j]) - exact) <= e64
    assert torch.equal(tke.cosine64(q, g, normalize=False)[2:4, 5:9], tke.cosine64(q[2:4], g[5:9], normalize=False))


# NaN / overflow detection in screened mode: tests/ops/test_topk_epilogue.py (parametrized on screen).


def test_screen_argument():
    with pytest.raises(ValueError, match="screen"):
        tke.cosine_topk_epilogue(torch.randn(2, 4), torch.randn(9, 4), 3, screen="yes")
    q, g = torch.randn(3, 16), torch.randn(200, 16)
    off = tke.cosine_topk_epilogue(q, g, 7, screen=None)  # default: the fp32 exact mode
    assert torch.equal(off[1], tke.cosine_topk_epilogue(q, g, 7, screen=False)[1])


# ---- on a GPU (marked cuda; skipped here) ------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 10, 100, 1000, 4096])
@pytest.mark.parametrize("normalize,exclude_self", [(True, False), (False, False), (True, True)])
def test_cuda_screened_equals_float64_reference(k, normalize, exclude_self):
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(20000, 512, generator=gen)
    q = g[:64].clone() if exclude_self else torch.randn(64, 512, generator=gen)
    ref = reference(q, g, k, normalize, exclude_self)
    got = screened(q.cuda(), g.cuda(), k, normalize=normalize, exclude_self=exclude_self)
    assert_equal(got, ref)


@pytest.mark.cuda
def test_cuda_near_ties_and_duplicates():
    q, g = near_tie_data(512)
    assert_equal(screened(q.cuda(), g.cuda(), 10, chunk_size=128), reference(q, g, 10))
    assert tke.screen_stats["screened"] == 6
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(30000, 64, generator=gen)
    g[torch.randperm(30000, generator=gen)[:2500]] = g[7].clone()
    q = torch.cat([g[7:8], torch.randn(7, 64, generator=gen)])
    assert_equal(screened(q.cuda(), g.cuda(), 40), reference(q, g, 40))


@pytest.mark.cuda
def test_cuda_same_result_as_the_cpu_twin():
    """Device independence: the GPU (kernel, cuBLAS bf16) and the CPU (twin, upcast GEMM) agree."""
    gen = torch.Generator().manual_seed(11)
    q, g = torch.randn(100, 256, generator=gen), torch.randn(50000, 256, generator=gen)
    cpu = screened(q, g, 100)
    gpu = screened(q.cuda(), g.cuda(), 100)
    assert_equal(gpu, cpu)


@pytest.mark.cuda
def test_cuda_negative_control(monkeypatch):
    q, g = near_tie_data(512)
    monkeypatch.setattr(tke, "_EPS_SCALE", 0.0)
    assert not torch.equal(screened(q.cuda(), g.cuda(), 5, chunk_size=128)[1].cpu(), reference(q, g, 5)[1])
