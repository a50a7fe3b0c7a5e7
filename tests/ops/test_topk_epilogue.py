"""The top-k epilogue provider (bct_fast.ops.topk_epilogue): its chunk loop with the PyTorch twin
of the selection kernel on the CPU against cosine_topk's exact fp32 path (bit for bit: same
scores, same indices), argument errors, NaN detection; and (marked cuda) the real kernel on a GPU
against the twin and against cupy (an independent matmul + argsort)."""
from __future__ import annotations

import math

import pytest
import torch

from bct_fast.ops import topk as topk_mod
from bct_fast.ops import topk_epilogue as tke
from bct_fast.ops import topk_epilogue_torch as twin
from bct_fast.ops.topk import cosine_topk
from topk_reference import assert_matches_cupy

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("topk_epilogue",)


@pytest.fixture(autouse=True)
def _no_screen(monkeypatch):
    monkeypatch.setattr(topk_mod, "_SCREEN", False, raising=False)  # the plain exact path


def exact_and_epilogue(q, g, k, normalize=True, exclude_self=False, chunk_size=None):
    """cosine_topk's exact fp32 result, and the epilogue provider's (twin) with that path's block
    shapes and block product, so both see the same GEMM bits."""
    ref = cosine_topk(q, g, k, normalize=normalize, exclude_self=exclude_self,
                      chunk_size=chunk_size, backend="torch")
    chunk, q_block = topk_mod.block_shape(q.shape[0], g.shape[0], q.shape[1], k, "cpu", chunk_size)
    got = tke.cosine_topk_epilogue(q, g, k, normalize, exclude_self, chunk, tke.TORCH_SELECTOR,
                                   query_block=q_block,
                                   product=lambda a, b: topk_mod._block_product(a, b)[0])
    return ref, got


def assert_same(ref, got):
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert torch.equal(got[0], ref[0]), (got[0] - ref[0]).abs().max()
    assert torch.equal(got[1], ref[1])


# (Q, N, d, k, chunk): Q=1, N not a multiple of the chunk, k=1, k=N, one chunk, chunk < k.
CASES = [(1, 257, 16, 5, 64), (37, 1000, 24, 1, 128), (37, 1000, 24, 10, 100), (64, 530, 33, 100, 96),
         (9, 300, 8, 300, 64), (5, 777, 40, 50, None), (70, 400, 12, 7, 1)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("Q,N,d,k,chunk", CASES)
def test_twin_loop_equals_exact_path(Q, N, d, k, chunk, normalize):
    gen = torch.Generator().manual_seed(Q * 1000 + N + k)
    q, g = torch.randn(Q, d, generator=gen), torch.randn(N, d, generator=gen) * 3
    assert_same(*exact_and_epilogue(q, g, k, normalize, chunk_size=chunk))


def test_k_4096():
    gen = torch.Generator().manual_seed(4)
    q, g = torch.randn(3, 8, generator=gen), torch.randn(5000, 8, generator=gen)
    assert_same(*exact_and_epilogue(q, g, 4096, chunk_size=1500))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [16, 64, 1000])
def test_exclude_self(normalize, chunk):
    gen = torch.Generator().manual_seed(chunk)
    g = torch.randn(150, 12, generator=gen)
    ref, got = exact_and_epilogue(g[:60].clone(), g, 149, normalize, exclude_self=True, chunk_size=chunk)
    assert_same(ref, got)
    assert not (got[1] == torch.arange(60)[:, None]).any()


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_duplicates_and_quantized_values(normalize):
    """Duplicated gallery rows and values in {-1, 0, 1}: many exact ties, all to the lower index;
    zero scores (also all-zero rows) tie with each other."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randint(-1, 2, (40, 6), generator=gen).float()
    g = base[torch.randint(0, 40, (500,), generator=gen)]
    g[::17] = 0.0
    q = torch.randint(-1, 2, (23, 6), generator=gen).float()
    for k in (1, 13, 200, 500):
        ref, got = exact_and_epilogue(q, g, k, normalize, chunk_size=64)
        assert_same(ref, got)


def test_ties_across_chunks_go_to_lower_index():
    g = torch.ones(100, 4)
    s, i = tke.cosine_topk_epilogue(torch.ones(2, 4), g, 30, chunk_size=7)
    assert torch.equal(i, torch.arange(30).expand(2, -1))
    assert torch.equal(s, torch.ones(2, 30))


def test_default_loop_matches_float64_topk():
    """The default block shapes and product: within fp32 rounding of float64 cosine, and the
    indices are a valid top-k (no float64 score clearly better was left out)."""
    gen = torch.Generator().manual_seed(3)
    q, g = torch.randn(20, 64, generator=gen), torch.randn(3000, 64, generator=gen)
    s, i = tke.cosine_topk_epilogue(q, g, 25)
    q64 = torch.nn.functional.normalize(q.double(), dim=1)
    ref = q64 @ torch.nn.functional.normalize(g.double(), dim=1).T
    assert (s.double() - ref.gather(1, i)).abs().max() < 1e-6
    assert (ref.topk(25, 1).values[:, -1] <= s[:, -1].double() + 1e-6).all()


def test_bf16_operands_exact_topk_of_bf16_scores():
    """bf16 mode: the exact top-k of the fp32 scores of the bf16 vectors (within fp32 rounding of
    their float64 cosine)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(9, 48, generator=gen).bfloat16()
    g = torch.randn(700, 48, generator=gen).bfloat16()
    s, i = tke.cosine_topk_epilogue(q, g, 40, chunk_size=128)
    ref = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T
    assert (s.double() - ref.gather(1, i)).abs().max() < 1e-5
    assert (ref.topk(40, 1).values[:, -1] <= s[:, -1].double() + 1e-5).all()
    assert (s[:, :-1] >= s[:, 1:]).all()


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("where", ["queries", "gallery"])
def test_nan_is_detected_not_ranked(where, screen):
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(4, 8, generator=gen), torch.randn(90, 8, generator=gen)
    (q if where == "queries" else g)[2, 3] = math.nan
    for normalize in (True, False):
        with pytest.raises(ValueError, match=where):
            tke.cosine_topk_epilogue(q, g, 5, normalize=normalize, chunk_size=32, screen=screen)


@pytest.mark.parametrize("screen", [False, True])
def test_overflowing_scores_are_detected(screen):
    g = torch.full((10, 4), 3e38)
    with pytest.raises(ValueError, match="not finite"):
        tke.cosine_topk_epilogue(torch.full((2, 4), 3e38), g, 3, normalize=False, screen=screen)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k:"), (dict(k=91), "k:"), (dict(k=2.0), "k:"), (dict(k=True), "k:"),
    (dict(k=90, exclude_self=True), "k:"), (dict(k=3, chunk_size=0), "chunk_size"),
    (dict(k=3, query_block=-1), "query_block"),
])
def test_argument_errors(kwargs, match):
    q, g = torch.randn(4, 8), torch.randn(90, 8)
    with pytest.raises(ValueError, match=match):
        tke.cosine_topk_epilogue(q, g, **kwargs)


def test_other_errors():
    with pytest.raises(ValueError, match="k:"):
        tke.cosine_topk_epilogue(torch.randn(2, 4), torch.randn(5000, 4), 4097)
    with pytest.raises(ValueError, match="float64"):
        tke.cosine_topk_epilogue(torch.randn(2, 4).double(), torch.randn(9, 4), 3)
    with pytest.raises(ValueError, match="dim"):
        tke.cosine_topk_epilogue(torch.randn(2, 4), torch.randn(9, 5), 3)
    with pytest.raises(ValueError, match="exclude_self"):
        tke.cosine_topk_epilogue(torch.randn(10, 4), torch.randn(9, 4), 3, exclude_self=True)
    with pytest.raises(ValueError, match="selector"):
        tke.cosine_topk_epilogue(torch.randn(2, 4), torch.randn(9, 4), 3, selector=tke.CUDA_SELECTOR)
    assert tke.unsupported(torch.float32, torch.float32, 4097) is not None
    assert tke.unsupported(torch.float64, torch.float32, 1).expected
    assert tke.unsupported(torch.bfloat16, torch.bfloat16, 4096) is None


def test_twin_select_block_contract():
    """One block into partly filled lists: the list keeps ties against the block, -0 == +0,
    non-finite scores flag and are never selected, the excluded column is skipped."""
    run_s = torch.tensor([[2.0, 0.0, -math.inf, -math.inf]])
    run_i = torch.tensor([[3, 5, -1, -1]])
    block = torch.tensor([[-0.0, 2.0, math.nan, 1.0, 7.0]])
    flag = torch.zeros(1, dtype=torch.int32)
    twin.select_block(block, None, None, 4, 10, True, 4, run_s, run_i, flag)  # column 4 excluded
    assert flag.item() == 1
    assert torch.equal(run_i, torch.tensor([[3, 11, 13, 5]]))
    assert torch.equal(run_s, torch.tensor([[2.0, 2.0, 1.0, 0.0]]))


# ---- on a GPU (marked cuda; skipped here) ------------------------------------------------------

def _gpu_inputs(Q, N, d, dtype, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        base = torch.randint(-2, 3, (64, d), generator=gen).float()
        g = base[torch.randint(0, 64, (N,), generator=gen)]
        q = torch.randint(-2, 3, (Q, d), generator=gen).float()
    else:
        q, g = torch.randn(Q, d, generator=gen), torch.randn(N, d, generator=gen)
    return q.to("cuda", dtype), g.to("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 64, 256, 257, 1000, 4096])
@pytest.mark.parametrize("exclude_self,ties", [(False, False), (True, False), (False, True)])
def test_cuda_kernel_equals_twin(dtype, k, exclude_self, ties):
    """The kernel and the twin on the same GEMM blocks: bit for bit."""
    _assert_kernel_equals_twin(300, 128, dtype, k, exclude_self, ties)


def _assert_kernel_equals_twin(Q, query_block, dtype, k, exclude_self, ties=False):
    q, g = _gpu_inputs(Q, 9000, 64, dtype, k, ties)
    if exclude_self:
        q = g[:Q].clone()
    kw = dict(k=k, exclude_self=exclude_self, chunk_size=2048, query_block=query_block)
    got = tke.cosine_topk_epilogue(q, g, selector=tke.CUDA_SELECTOR, **kw)
    ref = tke.cosine_topk_epilogue(q, g, selector=tke.TORCH_SELECTOR, **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.cuda
@pytest.mark.parametrize("k,exclude_self,dtype", [(257, True, torch.bfloat16), (4096, False, torch.float32)])
def test_cuda_kernel_equals_twin_sanitizer_sized(k, exclude_self, dtype):
    """Two of the sweep's cases with the largest kept lists (k = 257: the 1024-entry instantiation,
    with exclude_self; k = 4096: the largest, more than a chunk's 2048 columns), on 24 queries:
    small enough for racecheck, which was still on the 300-query k = 4096 case after 38 s on the
    first GPU run. Bit for bit, as above."""
    _assert_kernel_equals_twin(24, 16, dtype, k, exclude_self)


@pytest.mark.cuda
def test_cuda_nan_flag():
    q, g = _gpu_inputs(16, 5000, 32, torch.float32, 0)
    g[4000, 1] = math.nan
    with pytest.raises(ValueError, match="gallery"):
        tke.cosine_topk_epilogue(q, g, 10, selector=tke.CUDA_SELECTOR)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [10, 100, 1000])
def test_cuda_kernel_against_cupy(k):
    """cupy's own matmul and argsort as an independent reference: same scores within fp32
    rounding, and every returned index is a true top-k member up to near-ties."""
    q, g = _gpu_inputs(64, 20000, 128, torch.float32, k)
    s, i = tke.cosine_topk_epilogue(q, g, k, selector=tke.CUDA_SELECTOR)
    assert_matches_cupy(s, i, q, g, k, atol=1e-5)


def test_cosine_topk_routes_backend_epilogue():
    """cosine_topk(backend="epilogue") runs this provider (on CPU: its twin loop): the same
    neighbours as the torch path; galleries it cannot take are refused naming ``backend``."""
    from bct_fast.ops import cosine_topk

    g = torch.Generator().manual_seed(5)
    q, gal = torch.randn(9, 33, generator=g), torch.randn(1001, 33, generator=g)
    s_e, i_e = cosine_topk(q, gal, 17, backend="epilogue")
    s_t, i_t = cosine_topk(q, gal, 17, backend="torch")
    assert torch.equal(i_e, i_t)
    torch.testing.assert_close(s_e, s_t, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        cosine_topk(q, gal.numpy(), 17, backend="epilogue")
