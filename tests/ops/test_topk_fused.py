"""The fused search provider (bct_fast.ops.topk_fused): routing of backend="fused", argument
errors, and (marked cuda) the kernels on a GPU against float64 and against cupy. The kernels
themselves are checked on the CPU emulator in test_topk_fused_emulated.py; the provider's chunk and
query-block loop runs there too, through an emulator-backed launch (below)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bct_fast.ops import providers
from bct_fast.ops import topk_fused as tkf
from bct_fast.ops.topk import cosine_topk
from topk_reference import assert_matches_cupy, assert_topk_matches_reference

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("topk_fused", "topk_epilogue")

CUDA = torch.device("cuda")


def ok():
    return None


def _bf16(Q, N, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(Q, d, generator=gen).bfloat16(), torch.randn(N, d, generator=gen).bfloat16()


def test_fused_backend_on_cpu_tensors_is_an_error():
    q, g = _bf16(3, 50, 16, 0)
    with pytest.raises(ValueError, match="backend: 'fused' needs CUDA tensors"):
        cosine_topk(q, g, 5, backend="fused")


def test_fused_backend_names_what_it_cannot_serve(monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: True)
    k_big = lambda: tkf.Unsupported("k=129 is above the fused kernel's limit of 128", expected=True)  # noqa: E731
    with pytest.raises(ValueError, match="fused provider of cosine_topk cannot serve.*k=129"):
        providers.choose("cosine_topk", CUDA, "fused", ok, ok, k_big)
    assert providers.choose("cosine_topk", CUDA, "fused", ok, ok, ok).provider == "fused"


def test_auto_picks_fused_search_only_once_its_family_is_verified(monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setenv(providers.UNVERIFIED_ENV, "1")  # the SIMT kernels, never the fused ones
    monkeypatch.setattr(providers, "_verified", lambda family: False)  # whatever the record says
    assert providers.choose("cosine_topk", CUDA, "auto", ok, ok, ok).provider == "cuda"
    monkeypatch.setattr(providers, "_verified", lambda family: family == "topk_fused")
    c = providers.choose("cosine_topk", CUDA, "auto", ok, ok, ok)
    assert c.provider == "fused" and not c.warn
    # both verified: the epilogue provider first (585 ms vs 1101 ms on the H200's goal row) ...
    monkeypatch.setattr(providers, "_verified", lambda family: family in ("topk_fused", "topk_epilogue"))
    assert providers.choose("cosine_topk", CUDA, "auto", ok, ok, ok).provider == "epilogue"
    # ... and the fused one where the epilogue provider cannot serve the call
    no = lambda: tkf.Unsupported("gallery", expected=True)  # noqa: E731
    assert providers.choose("cosine_topk", CUDA, "auto", ok, no, ok).provider == "fused"


def test_unsupported_says_why():
    q, _ = _bf16(2, 2, 8, 0)
    assert "CUDA only" in tkf.unsupported(q, torch.bfloat16, 5).reason


def _fake_launch(*args, **kwargs):  # arguments are checked before any launch
    raise AssertionError("launched")


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k: expected an integer in \\[1, 50\\]"),
    (dict(k=129), "k: expected an integer in \\[1, 50\\]"),
    (dict(k=2.0), "k: expected"),
    (dict(k=5, chunk_size=0), "chunk_size"),
    (dict(k=5, query_block=True), "query_block"),
    (dict(k=5, splits=-1), "splits"),
])
def test_argument_errors(kwargs, match):
    q, g = _bf16(3, 50, 16, 0)
    with pytest.raises(ValueError, match=match):
        tkf.cosine_topk_fused(q, g, launch=_fake_launch, **kwargs)


def test_other_errors():
    q, g = _bf16(3, 500, 16, 0)
    with pytest.raises(ValueError, match="k: expected an integer in \\[1, 128\\]"):
        tkf.cosine_topk_fused(q, g, 129, launch=_fake_launch)
    with pytest.raises(ValueError, match="queries, gallery: the fused provider takes bfloat16"):
        tkf.cosine_topk_fused(q.float(), g, 5, launch=_fake_launch)
    with pytest.raises(ValueError, match="gallery: has dim"):
        tkf.cosine_topk_fused(q, g[:, :8], 5, launch=_fake_launch)
    with pytest.raises(ValueError, match="exclude_self"):
        tkf.cosine_topk_fused(g, q, 2, exclude_self=True, launch=_fake_launch)
    with pytest.raises(ValueError, match="fused provider cannot serve them.*CUDA only"):
        tkf.cosine_topk_fused(q, g, 5)  # no launch given: CPU tensors are refused
    bad = q.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="queries"):
        tkf.cosine_topk_fused(bad, g, 5, launch=_fake_launch)


def test_inverse_norms_in_slices_equal_one_pass():
    """The gallery's inverse norms are computed a slice at a time (bounded memory): same bits."""
    from bct_fast.ops.rows import inv_row_norms, inv_row_norms_stepped

    _, g = _bf16(1, 2500, 33, 4)
    g[7] = 0  # a zero row keeps its finite floor
    assert torch.equal(inv_row_norms_stepped(g, step=1000), inv_row_norms(g, torch.float32))


def test_the_search_family_is_recorded():
    from bct_fast._core import extension

    assert providers.FUSED_FAMILIES["cosine_topk"] == "topk_fused"
    assert "topk_fused" in extension.KERNEL_SOURCES
    assert "csrc/cuda/topk_fused*" in extension.KERNEL_SOURCES["topk_fused"]
    assert extension.EMULATED_BY["topk_fused"] == "tests/ops/test_topk_fused_emulated.py"


# ---- the provider's loop on the CPU emulator (marked emulated) ---------------------------------

def emu_launch(q, g, inv_nq, inv_ng, k, n0, exclude, self_col0, run_s, run_i, flag, splits=None):
    """The same launcher call as :func:`tkf.native_launch`, run by the kernel emulator (CPU
    tensors; one schedule seed: the kernel-level tests try two)."""
    import kernel_emulator as emu

    M, d = q.shape
    params = dict(Q=M, N=g.shape[0], d=d, k=k, n0=n0, exclude=exclude, self_col0=self_col0)
    if splits is not None:
        params["splits"] = splits
    arrays = dict(q=q.view(torch.int16).numpy(), g=g.view(torch.int16).numpy(),
                  inv_nq=None if inv_nq is None else inv_nq.numpy(),
                  inv_ng=None if inv_ng is None else inv_ng.numpy(),
                  run_s=run_s.numpy(), run_i=run_i.numpy(), nonfinite=flag.numpy())
    out = emu.run("fused_topk", arrays, params, seeds=(1,))
    run_s.copy_(torch.from_numpy(np.frombuffer(out["run_s"], np.float32).reshape(M, k).copy()))
    run_i.copy_(torch.from_numpy(np.frombuffer(out["run_i"], np.int64).reshape(M, k).copy()))
    flag.copy_(torch.from_numpy(np.frombuffer(out["nonfinite"], np.int32).copy()))


@pytest.fixture
def emulator():
    import kernel_emulator as emu
    emu.require_built()


@pytest.mark.emulated
@pytest.mark.parametrize("normalize", [True, False])
def test_provider_loop_on_the_emulated_kernels(emulator, normalize):
    """cosine_topk_fused's chunk / query-block loop, launch arguments included (self_col0 of
    later chunks, list slices), on the emulated kernels: float64-exact up to fp32 noise, and the
    same bits for one launch as for 3 chunks x 2 query blocks x 2 splits."""
    q, g = _bf16(40, 450, 24, 7 + normalize)
    one = tkf.cosine_topk_fused(q, g, 9, normalize, launch=emu_launch)
    many = tkf.cosine_topk_fused(q, g, 9, normalize, chunk_size=160, query_block=25, splits=2,
                                 launch=emu_launch)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert_topk_matches_reference(one[0], one[1], q, g, 9, atol=1e-5 if normalize else 1e-4,
                                  normalize=normalize)


@pytest.mark.emulated
def test_provider_loop_exclude_self_and_nan_on_the_emulated_kernels(emulator):
    """exclude_self across chunk boundaries (query i is row i of a later chunk), and a NaN in
    the gallery found through the sticky flag."""
    _, g = _bf16(1, 300, 16, 3)
    q = g[:70].clone()
    s, i = tkf.cosine_topk_fused(q, g, 5, exclude_self=True, chunk_size=64, query_block=32,
                                 launch=emu_launch)
    assert not (i == torch.arange(70)[:, None]).any()
    assert_topk_matches_reference(s, i, q, g, 5, atol=1e-5, exclude_self=True)
    bad = g.clone()
    bad[250, 2] = math.nan
    with pytest.raises(ValueError, match="gallery"):
        tkf.cosine_topk_fused(q, bad, 5, chunk_size=128, launch=emu_launch)


# ---- on a GPU (marked cuda; skipped here) ------------------------------------------------------

def _gpu(Q, N, d, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct rows: many exactly equal scores
        base = torch.randint(-2, 3, (32, d), generator=gen).float()
        g = base[torch.randint(0, 32, (N,), generator=gen)]
        q = torch.randint(-2, 3, (Q, d), generator=gen).float()
    else:
        q, g = torch.randn(Q, d, generator=gen), torch.randn(N, d, generator=gen)
    return q.to("cuda", torch.bfloat16), g.to("cuda", torch.bfloat16)


# Q = 1, non-multiples of the 128 tiles, d % 8 != 0 (plain-load path), k = N, k = 128.
GPU_CASES = [(1, 1, 8, 1), (1, 1000, 64, 10), (130, 129, 40, 129 - 1), (300, 9000, 100, 128),
             (700, 20_000, 512, 100), (37, 7777, 13, 33), (2048, 10_000, 256, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("Q,N,d,k", GPU_CASES)
def test_cuda_fused_matches_float64(seed, Q, N, d, k, normalize):
    """Against float64 of the same bf16 values: scores within fp32 accumulation error, every
    returned index holds its rank's score, clearly ordered ranks in place."""
    q, g = _gpu(Q, N, d, seed)
    s, i = tkf.cosine_topk_fused(q, g, k, normalize)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (Q, k)
    assert_topk_matches_reference(s, i, q.cpu(), g.cpu(), k, atol=2e-5 * (1 if normalize else d ** 0.5 * 4),
                                  normalize=normalize)


@pytest.mark.cuda
@pytest.mark.parametrize("Q,N,d,k,splits", [(1, 1, 8, 1, 1), (130, 300, 40, 33, 3), (5, 700, 13, 128, 2)])
def test_cuda_fused_small(Q, N, d, k, splits):
    """Small launches (both load paths, both k variants, several splits, one-row chunks): what
    gpu_session.sh runs under compute-sanitizer memcheck and racecheck."""
    q, g = _gpu(Q, N, d, Q + N)
    s, i = tkf.cosine_topk_fused(q, g, k, splits=splits, chunk_size=max(1, N // 2))
    assert_topk_matches_reference(s, i, q.cpu(), g.cpu(), k, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 2, 7])
def test_cuda_fused_does_not_depend_on_splits_or_chunks(splits):
    """Same scores and indices bit for bit for any split count, chunking or query blocking."""
    q, g = _gpu(200, 30_000, 96, splits)
    ref = tkf.cosine_topk_fused(q, g, 50, splits=1)
    got = tkf.cosine_topk_fused(q, g, 50, splits=splits, chunk_size=7000, query_block=130)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 32, 128])
def test_cuda_fused_ties_and_exclude_self(k):
    """Exactly equal scores go to the lower index; exclude_self drops each query's own row.
    Integer-valued rows make every dot product exact in any summation order, so the kernel's fp32
    scores are reproduced bit for bit here: the dot, then * inv_nq * inv_ng in fp32 (the
    provider's own inverse norms), and the expected lists follow by (score desc, index asc)."""
    from bct_fast.ops.rows import inv_row_norms

    _, g = _gpu(150, 5000, 32, k, ties=True)
    q = g[:150].clone()
    s, i = tkf.cosine_topk_fused(q, g, k, exclude_self=True, chunk_size=1500)
    dots = (q.double() @ g.double().T).float().cpu()  # small integers: exact
    inq, ing = inv_row_norms(q, torch.float32).cpu(), inv_row_norms(g, torch.float32).cpu()
    v = dots * inq[:, None] * ing[None, :] + 0.0  # fp32, the kernel's order; -0 -> +0
    v.fill_diagonal_(-math.inf)
    idx = np.lexsort((np.broadcast_to(np.arange(v.shape[1]), v.shape), -v.double().numpy()), axis=1)[:, :k]
    assert torch.equal(i.cpu(), torch.from_numpy(idx))
    assert torch.equal(s.cpu(), v.gather(1, torch.from_numpy(idx)))
    assert not (i.cpu() == torch.arange(150)[:, None]).any()


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["queries", "gallery"])
def test_cuda_fused_nan_is_detected_not_ranked(where):
    q, g = _gpu(16, 5000, 32, 0)
    (q if where == "queries" else g)[3, 1] = math.nan
    with pytest.raises(ValueError, match=where):
        tkf.cosine_topk_fused(q, g, 10)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [10, 100])
def test_cuda_fused_against_cupy(k):
    """cupy's own float64 matmul and argsort as an independent reference."""
    q, g = _gpu(64, 20_000, 128, k)
    s, i = tkf.cosine_topk_fused(q, g, k)
    assert_matches_cupy(s, i, q, g, k, atol=2e-5)


@pytest.mark.cuda
def test_cuda_cosine_topk_routes_backend_fused():
    q, g = _gpu(33, 3000, 64, 1)
    s_f, i_f = cosine_topk(q, g, 20, backend="fused")
    s_e, i_e = cosine_topk(q, g, 20, backend="epilogue")
    torch.testing.assert_close(s_f, s_e, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="fused provider of cosine_topk cannot serve.*k=129"):
        cosine_topk(q, g, 129, backend="fused")


@pytest.mark.cuda
@pytest.mark.parametrize("Q,k,named", [(16, 20, "fused"), (128, 128, "fused"), (129, 20, "epilogue"),
                                       (16, 129, "epilogue")])
def test_cuda_auto_routes_by_batch_and_k(monkeypatch, Q, k, named):
    """`auto` on a GPU with the families verified (forced here, so that a run of changed sources
    tests the same routing): fused for up to 128 bf16 queries and k <= 128, else the epilogue
    provider; the named provider's results bit for bit. The build has code for this GPU and
    the device's opt-in shared memory is what device_limits reads."""
    from bct_fast._core.extension import build_runs_on
    from bct_fast.ops import device_limits

    assert build_runs_on(torch.cuda.get_device_capability()) is not False
    props = torch.cuda.get_device_properties(0)
    if hasattr(props, "shared_memory_per_block_optin"):
        assert device_limits.optin_smem(torch.device("cuda", 0)) == props.shared_memory_per_block_optin
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    q, g = _gpu(Q, 3000, 64, Q + k)
    s, i = cosine_topk(q, g, k)
    s_n, i_n = cosine_topk(q, g, k, backend=named)
    assert torch.equal(s, s_n) and torch.equal(i, i_n)
    assert_topk_matches_reference(s, i, q.cpu(), g.cpu(), k, atol=2e-5)
