"""bf16-screened exact top-k (ops.topk_screen): bitwise the exact fp32 path's answer, on random
and adversarial inputs; the error bound holds; a bound too small gives wrong answers."""
import numpy as np
import pytest
import torch

from bct_fast.ops import cosine_topk, cpu_gemm, topk, topk_screen
from bct_fast.ops.rows import inv_row_norms, normalize_rows


def unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def both(monkeypatch, q, g, k, **kw):
    """(exact result, screened result, the screened call's stats: {} when it did not screen)."""
    monkeypatch.setattr(topk, "_SCREEN", False)
    exact = cosine_topk(q, g, k, **kw)
    monkeypatch.setattr(topk, "_SCREEN", True)
    topk._last_screen_stats.clear()
    screened = cosine_topk(q, g, k, **kw)
    return exact, screened, dict(topk._last_screen_stats)


def assert_identical(exact, screened):
    assert torch.equal(exact[1], screened[1]), "indices differ from the exact fp32 path"
    assert torch.equal(exact[0], screened[0]), "scores differ (bitwise) from the exact fp32 path"


def onednn_blocks(Q, N, d, k, chunk_size=None):
    """The exact path's blocks are row-major oneDNN products (where rescoring is sure to match)."""
    chunk, q_block = topk.block_shape(Q, N, d, k, "cpu", chunk_size)
    rows = min(min(q_block, Q - q0) for q0 in (0, (Q - 1) // q_block * q_block))
    cols = min(min(chunk, N - n0) for n0 in (0, (N - 1) // chunk * chunk))
    return rows >= 64 and cpu_gemm.onednn_active() and rows * cols * d >= 1 << 21


@pytest.mark.parametrize("Q,N,d,k,kw", [
    (1, 1001, 3, 1, {}), (1, 4097, 64, 4097, {}), (3, 501, 130, 500, dict(exclude_self=True)),
    (64, 9001, 3, 1, {}), (100, 9001, 3, 9001, {}), (64, 3001, 64, 3001, {}), (130, 7777, 130, 17, {}),
    (257, 20001, 64, 5, dict(normalize=False)), (65, 1000, 130, 10, dict(chunk_size=97)),
    (200, 10003, 64, 50, dict(exclude_self=True)), (80, 9000, 130, 8999, dict(exclude_self=True)),
])
def test_identical_to_exact_on_random_shapes(monkeypatch, seed, cpu_select, Q, N, d, k, kw):
    q, g = torch.randn(Q, d), torch.randn(N, d)
    exact, screened, stats = both(monkeypatch, q, g, k, **kw)
    assert_identical(exact, screened)
    if onednn_blocks(Q, N, d, k, kw.get("chunk_size")):
        assert stats and stats["screened"] + stats["fallback"] == Q, "the screen did not run"


def test_identical_through_both_gemm_routes(monkeypatch, seed, cpu_gemm):
    """With torch.mm (MKL) blocks the rescoring product must reproduce MKL's bits, or the call
    is not screened: identical either way."""
    q, g = torch.randn(300, 64), torch.randn(20000, 64)
    exact, screened, _ = both(monkeypatch, q, g, 10)
    assert_identical(exact, screened)


def flip_data(d=256, queries=96, per_query=48, spacing=1e-5, background=4000, seed=0):
    """Per query a cluster of rows at exact cosines 0.03 + j * spacing, closer than the bf16
    screen resolves: at d = 256 its input rounding moves a score by ~2.5e-4 while the output
    quantum near 0.03 is 2^-13 = 1.2e-4, so the screen misorders them (and no wide tie of
    rounded outputs hides it). Queries are orthonormal and every other direction is orthogonal
    to all of them: a query scores 0 with the other clusters and the background. Rows are
    shuffled, so gallery order is not score order."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    q = basis[:, :queries].T                       # orthonormal queries
    rest = basis[:, queries:]                      # the orthogonal complement
    rows = []
    for i in range(queries):
        p = unit(torch.randn(per_query, rest.shape[1], generator=gen, dtype=torch.float64)) @ rest.T
        c = 0.03 + spacing * torch.arange(per_query, dtype=torch.float64)[:, None]
        rows.append(c * q[i] + (1 - c * c).sqrt() * p)
    bg = unit(torch.randn(background, rest.shape[1], generator=gen, dtype=torch.float64)) @ rest.T
    g = torch.cat([bg] + rows).float()
    return q.float(), g[torch.randperm(g.shape[0], generator=gen)]


def screened_order_flips(q, g):
    """Pairs whose bf16-screened order is the reverse of their exact fp32 order (any query)."""
    exact = q @ g.T
    screen = (q.bfloat16() @ g.bfloat16().T).float()
    top = exact.topk(40, dim=1).indices
    e, s = exact.gather(1, top), screen.gather(1, top)
    return int(((e[:, :, None] > e[:, None, :]) & (s[:, :, None] < s[:, None, :])).sum())


@pytest.mark.parametrize("spacing", [1e-5, 1e-7], ids=["flips", "below-bf16-resolution"])
def test_near_ties_that_the_screen_misorders(monkeypatch, cpu_select, spacing):
    q, g = flip_data(spacing=spacing)
    assert screened_order_flips(q, g) > 100, "the data must defeat the screen's order"
    for k in (1, 5, 20):
        for normalize in (True, False):
            exact, screened, stats = both(monkeypatch, q, g, k, normalize=normalize)
            assert_identical(exact, screened)
            assert stats["screened"] == q.shape[0] and stats["fallback"] == 0  # rescored, no fallback


def test_a_bound_too_small_gives_wrong_answers(monkeypatch):
    """Negative control: the same search with the bound scaled down misses exact neighbours, so
    the identity tests above can fail."""
    q, g = flip_data()
    exact, screened, _ = both(monkeypatch, q, g, 5)
    assert_identical(exact, screened)
    monkeypatch.setattr(topk_screen, "_EPS_SCALE", 0.01)
    _, wrong, _ = both(monkeypatch, q, g, 5)
    assert not torch.equal(exact[1], wrong[1])
    assert (exact[1] != wrong[1]).any(1).sum() > 10  # many queries, not one unlucky tie


def test_exact_duplicates_fall_back_to_the_exact_pass(monkeypatch, seed, cpu_select):
    """300 copies of a row tie exactly: more than the screen keeps per query (2k + 64), so those
    queries take the exact pass; ties still go to the lower index."""
    base = unit(torch.randn(2000, 64))
    dup = base[7:8].expand(300, -1)
    g = torch.cat([base[:1000], dup, base[1000:], dup[:100] * 3.0])  # scaled copies: ~equal cosines
    q = torch.cat([base[7:8] + 0.01 * torch.randn(40, 64), torch.randn(60, 64)])
    for normalize in (True, False):
        exact, screened, stats = both(monkeypatch, q, g, 10, normalize=normalize)
        assert_identical(exact, screened)
        assert stats["fallback"] >= 40 and stats["screened"] >= 1


def test_queries_equal_to_gallery_rows_and_exclude_self(monkeypatch, seed, cpu_select):
    """Queries are gallery rows (score 1 with themselves), some rows are duplicated later in the
    gallery (the copy ties with the excluded own row)."""
    g = unit(torch.randn(6000, 130))
    g[3000:3100] = g[:100]
    q = g[:100].clone()
    for kw in ({}, dict(exclude_self=True), dict(exclude_self=True, normalize=False)):
        exact, screened, stats = both(monkeypatch, q, g, 7, **kw)
        assert_identical(exact, screened)
        assert stats["screened"] + stats["fallback"] == 100
    assert (screened[1][:, 0] == torch.arange(3000, 3100)).all()  # own row excluded: the copy wins


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_half_precision_galleries(monkeypatch, seed, storage):
    q, g = torch.randn(100, 64), torch.randn(9000, 64).to(storage)
    for normalize in (True, False):
        exact, screened, stats = both(monkeypatch, q, g, 10, normalize=normalize)
        assert_identical(exact, screened)
        if storage == torch.bfloat16 and not normalize:
            assert stats["gallery_dh"] < 1e-15  # bf16 rows screen exactly: only the queries round


def test_memmap_gallery(monkeypatch, seed, tmp_path):
    g = torch.randn(9000, 64)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=tuple(g.shape))
    mm[:] = g.numpy()
    mm.flush()
    ro = np.load(tmp_path / "g.npy", mmap_mode="r")
    exact, screened, stats = both(monkeypatch, torch.randn(100, 64), ro, 10, chunk_size=2000)
    assert_identical(exact, screened)
    assert stats["screened"] + stats["fallback"] == 100


def test_non_finite_gallery_is_still_named(monkeypatch, seed):
    g = torch.randn(9000, 64)
    g[5000, 3] = float("nan")
    monkeypatch.setattr(topk, "_SCREEN", True)
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(100, 64), g, 5)


def test_default_rule_leaves_small_searches_exact(monkeypatch):
    monkeypatch.setattr(topk, "_SCREEN", None)
    monkeypatch.delenv("BCT_FAST_SCREEN", raising=False)
    topk._last_screen_stats.clear()
    cosine_topk(torch.randn(100, 64), torch.randn(5000, 64), 5)
    assert not topk._last_screen_stats
    assert not topk._screen_pays(1, 1_000_000, 768, 10) and not topk._screen_pays(2000, 200_000, 64, 10)
    assert topk._screen_pays(2000, 200_000, 512, 10)  # a GEMM-bound search: measured faster


def test_rescoring_product_must_reproduce_the_block_bits():
    """Negative control for the probe: a block product no candidate reproduces (float64 sums
    rounded to fp32) gets no rescorer, so such a call is never screened."""
    def float64_block(a, b):
        return (a.double() @ b.double().T).float()

    cpu = torch.device("cpu")
    assert topk_screen.rescore_product(float64_block, {(64, 1000)}, 64, cpu) is None
    if cpu_gemm.onednn_active():
        r = topk_screen.rescore_product(lambda a, b: topk._block_product(a, b)[0], {(2000, 1048)}, 128, cpu)
        assert r is not None and 64 in r.sizes


# ---- the bound ----------------------------------------------------------------------------------

def aligned_rows(n, d, gen):
    """Rows whose every entry rounds to bf16 by almost a full half-unit in the same direction
    (all positive, just below a rounding midpoint): the input-rounding errors add up, the
    worst case of the bound's first term."""
    e = torch.randint(-6, 2, (n, d), generator=gen).float()
    return (1 + 2.0 ** -8 - 2.0 ** -21) * torch.exp2(e)


def draws(d, normalize, gen):
    yield torch.randn(40, d, generator=gen), torch.randn(500, d, generator=gen)
    scale = torch.exp2(torch.randint(-30, 30, (500, 1), generator=gen).float())
    yield torch.randn(40, d, generator=gen) * 1e3, torch.randn(500, d, generator=gen) * scale
    yield aligned_rows(40, d, gen), aligned_rows(500, d, gen)
    sparse = torch.randn(500, d, generator=gen) * (torch.rand(500, d, generator=gen) < 0.1)
    yield torch.randn(40, d, generator=gen).exp(), sparse
    g = torch.randn(500, d, generator=gen)
    yield g[:40] + 1e-4 * torch.randn(40, d, generator=gen), g


@pytest.mark.parametrize("d", [3, 64, 130, 512, 1024])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_bound_holds(d, normalize):
    """|screened - exact| <= a + c|screened| for every pair over many draws (random, huge and tiny
    rows, rounding-aligned rows, sparse rows, near-duplicates); <= unit_row_bound(d) for unit
    rows; and on the aligned rows the error reaches > 40% of the bound (it is not vacuous)."""
    gen = torch.Generator().manual_seed(d * 2 + normalize)
    worst = 0.0
    for rep in range(8):
        for i, (q, g) in enumerate(draws(d, normalize, gen)):
            qn = normalize_rows(q) if normalize else q
            inv = inv_row_norms(g) if normalize else None
            exact = topk._score_block(qn, g, inv, 0, 0, False).double()
            h16, terms = topk_screen.chunk_terms(g, inv)
            q16 = qn.bfloat16()
            s, c = topk_screen.screen_product(q16, h16)
            s = s.double()
            a = topk_screen.screen_bound_terms(qn, q16, terms, d)
            err = (s - exact).abs()
            bound = a[:, None] + c * s.abs()
            assert (err <= bound).all(), f"draw {i}: error {float((err / bound).max()):.3f} x the bound"
            if normalize:
                assert float(err.max()) <= topk_screen.unit_row_bound(d)
            if i == 2 and not normalize:
                worst = max(worst, float((err / bound).max()))
    if not normalize and d >= 64:
        assert worst > 0.4, f"the bound is loose on rounding-aligned rows ({worst:.2f} of it reached)"
