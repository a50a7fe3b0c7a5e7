"""The fused provider (bct_fast.ops.margin_softmax_fused): how `choose` routes backend="fused",
its refusals on CPU / non-bf16 tensors, and (marked cuda) the real kernels on a GPU: the mma and
PV tile checks against a host matmul (the fragment layouts against the hardware), the lse and the
lse + pws kernels against float64 and the provider against the epilogue provider. The kernels'
logic runs on the CPU emulator in test_fused_emulated.py and test_fused_pws_emulated.py."""
from __future__ import annotations

import pytest
import torch

from bct_fast.ops import cosine_margin_cross_entropy, providers
from bct_fast.ops import margin_softmax_epilogue as epi
from bct_fast.ops import margin_softmax_fused as fused
from bct_fast.ops.reference import cosine_margin_cross_entropy_ref
from bct_fast.ops.rows import inv_row_norms
from test_margin_ce import inputs, rel_err, run
from test_margin_epilogue import plain_bf16, provider_args
import test_providers

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_fused", "margin_epilogue")

CUDA = torch.device("cuda")  # only its type is read by choose: no GPU needed
compiled = test_providers.compiled


def ok():
    return None


def test_fused_backend_on_cpu_tensors_is_an_error():
    x, w, y = inputs(3, 10, 8, "cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend: 'fused' needs CUDA tensors"):
        cosine_margin_cross_entropy(x, w, y, backend="fused")
    with pytest.raises(ValueError, match="backend: 'fused' is not available for cosine_topk"):
        providers.choose("cosine_topk", CUDA, "fused", ok)


def test_fused_backend_names_what_it_cannot_serve(compiled):
    fp32 = lambda: providers.Unsupported("dtypes torch.float32 / torch.float32")  # noqa: E731
    with pytest.raises(ValueError, match="the fused provider of margin_softmax cannot serve.*float32"):
        providers.choose("margin_softmax", CUDA, "fused", ok, ok, fp32)
    assert providers.choose("margin_softmax", CUDA, "fused", ok, ok, ok).provider == "fused"


def test_fused_backend_needs_compiled_kernels(monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: False)
    with pytest.raises(ValueError, match="backend: 'fused' needs the CUDA kernels"):
        providers.choose("margin_softmax", CUDA, "fused", ok, ok, ok)


def test_auto_picks_fused_only_once_its_family_is_verified(compiled, monkeypatch):
    assert providers.choose("margin_softmax", CUDA, "auto", ok, ok, ok).provider == "torch"
    monkeypatch.setenv(providers.UNVERIFIED_ENV, "1")  # selects the SIMT kernels, never the fused ones
    assert providers.choose("margin_softmax", CUDA, "auto", ok, ok, ok).provider == "cuda"
    monkeypatch.delenv(providers.UNVERIFIED_ENV)
    monkeypatch.setattr(providers, "_verified", lambda family: family in ("margin_fused", "margin_epilogue"))
    c = providers.choose("margin_softmax", CUDA, "auto", ok, ok, ok)
    assert c.provider == "fused" and not c.warn
    fp32 = lambda: providers.Unsupported("fp32")  # noqa: E731
    assert providers.choose("margin_softmax", CUDA, "auto", ok, ok, fp32).provider == "epilogue"


def test_unsupported_says_why():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert "CUDA only" in fused.unsupported(x, x).reason


def test_mma_tile_check_refuses_bad_tiles():
    t = torch.zeros(16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a, b, c: expected 16 x 16 tiles"):
        fused.mma_tile_check(t[:8], t, t.float())
    with pytest.raises(ValueError, match="a, b: expected bfloat16 CUDA tensors"):
        fused.mma_tile_check(t, t, t.float())


def test_pv_tile_check_refuses_bad_tiles():
    t = torch.zeros(16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="p, w, c: expected 16 x 16 tiles"):
        fused.pv_tile_check(t[:8], t, t.float())
    with pytest.raises(ValueError, match="p, w: expected bfloat16 CUDA tensors"):
        fused.pv_tile_check(t, t, t.float())


def test_the_fused_family_is_recorded_and_emulated():
    from bct_fast._core import extension

    assert "margin_fused" in extension.KERNEL_SOURCES
    assert extension.EMULATED_BY["margin_fused"] == "tests/ops/test_fused_emulated.py"
    assert "csrc/cuda/mma_common*" in extension.KERNEL_SOURCES["margin_fused"]


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_mma_tile_matches_a_host_matmul(seed):
    """One 16 x 16 x 16 tile through cp.async -> ldmatrix -> mma.sync: the fragment layouts the
    kernel assumes, checked against the hardware (bf16 products are exact in fp32)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    c = torch.randn(16, 16, generator=g)
    got = fused.mma_tile_check(a.cuda(), b.cuda(), c.cuda()).cpu()
    ref = (c.double() + a.double() @ b.double().T).float()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-5), (got - ref).abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("B,C,d", [(1, 1, 16), (1, 5003, 64), (37, 20011, 40), (300, 2053, 512), (129, 1000, 129)])
def test_cuda_fused_lse_matches_float64(seed, B, C, d):
    """The fused forward statistics (over each row's non-target columns) against float64 of the
    same bf16 values: lse within 1e-5 relative; the loss and both gradients (backward = the
    epilogue provider's) within 2x the plain bf16 PyTorch error."""
    x, w, inv_nx, inv_nw, labels = (t.cuda() for t in provider_args(B, C, d, torch.bfloat16, seed))
    lse, pws = fused.softmax_stats(x, w, inv_nx, inv_nw, labels, 24.0, False)
    z = 24.0 * (x.double() @ w.double().T) * inv_nx.double()[:, None] * inv_nw.double()[None, :]
    rows = (labels >= 0).nonzero()[:, 0]
    z[rows, labels[rows]] = float("-inf")
    ref = torch.logsumexp(z, dim=1).cpu()
    assert pws.numel() == 0
    assert torch.allclose(lse.cpu().double(), ref, rtol=1e-5, atol=1e-5), (lse.cpu() - ref).abs().max()

    xs, ws, y = inputs(B, C, d, "cuda", dtype=torch.bfloat16)
    kw = dict(scale=32.0, margin_type="arcface", margin=0.4, ignore_index=-1)
    ours = run(cosine_margin_cross_entropy, xs, ws, y, False, backend="fused", **kw)
    peer = run(plain_bf16, xs, ws, y, False, **kw)
    want = run(cosine_margin_cross_entropy_ref, xs.double(), ws.double(), y, False, **kw)
    for name, o, p, r in zip(("loss", "grad_embeddings", "grad_weight"), ours, peer, want):
        assert rel_err(o, r) <= 2 * rel_err(p, r) + 1e-6, f"{name}: {rel_err(o, r):.2e} vs {rel_err(p, r):.2e}"


@pytest.mark.cuda
def test_cuda_pv_tile_matches_a_host_matmul(seed):
    """One 16 x 16 x 16 tile in the PV orientation (p as accumulator fragments packed into the A
    fragment, w row-major [k][n] through cp.async -> ldmatrix.trans -> mma.sync): the layouts the
    pws kernel assumes, checked against the hardware. p = I returns w itself."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(16, 16, generator=g).bfloat16()
    w = torch.randn(16, 16, generator=g).bfloat16()
    c = torch.randn(16, 16, generator=g)
    got = fused.pv_tile_check(p.cuda(), w.cuda(), c.cuda()).cpu()
    ref = (c.double() + p.double() @ w.double()).float()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-5), (got - ref).abs().max()
    eye = torch.eye(16).bfloat16().cuda()
    assert torch.equal(fused.pv_tile_check(eye, w.cuda(), torch.zeros(16, 16).cuda()).cpu(), w.float())


def _ref_lse_pws(x, w, inv_nx, inv_nw, labels, scale):
    """float64 lse and pws over each row's non-target columns (the op contract)."""
    z = scale * (x.double() @ w.double().T) * inv_nx.double()[:, None] * inv_nw.double()[None, :]
    rows = (labels >= 0).nonzero()[:, 0]
    z[rows, labels[rows]] = float("-inf")
    p = torch.softmax(z, dim=1)
    return torch.logsumexp(z, dim=1).cpu(), (p @ (w.double() * inv_nw.double()[:, None])).cpu()


def _row_err(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    return float(((a - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)).max())


@pytest.mark.cuda
@pytest.mark.parametrize("B,C,d", [(1, 1, 16), (3, 1000, 8), (65, 3001, 100), (130, 2053, 256),
                                   (300, 5003, 512), (64, 20011, 40), (129, 700, 128)])
def test_cuda_fused_lse_pws_matches_float64(seed, B, C, d):
    """The frozen classifier's forward (lse + pws in one kernel) against float64 of the same bf16
    values, over each row's non-target columns: lse (float64) within 1e-5; pws (P' in bf16) within
    2x the error of plain PyTorch bf16 (softmax in fp32, P and W_hat rounded to bf16, a bf16 matmul)
    or of the epilogue provider, whichever is larger, and 2e-2 of each row's largest entry."""
    args = tuple(t.cuda() for t in provider_args(B, C, d, torch.bfloat16, seed))
    lse, pws = fused.softmax_stats(*args, 20.0, True)
    ref_lse, ref_pws = _ref_lse_pws(*args, 20.0)
    assert pws.shape == (B, d) and pws.dtype == torch.float32 and lse.dtype == torch.float64
    assert torch.allclose(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5), (lse.cpu() - ref_lse).abs().max()
    _, epi_pws = epi.softmax_stats(*args, 20.0, True)
    ours, theirs = _row_err(pws, ref_pws), _row_err(epi_pws, ref_pws)
    plain = _row_err(_plain_bf16_pws(*args, 20.0), ref_pws)
    assert ours <= 2 * max(theirs, plain) + 1e-5 and ours <= 2e-2, (ours, theirs, plain)


def _plain_bf16_pws(x, w, inv_nx, inv_nw, labels, scale):
    """What PyTorch does in bf16: fp32 logits and softmax, P and W_hat rounded to bf16, matmul."""
    z = scale * (x.float() @ w.float().T) * inv_nx.float()[:, None] * inv_nw.float()[None, :]
    rows = (labels >= 0).nonzero()[:, 0]
    z[rows, labels[rows]] = float("-inf")
    p = torch.softmax(z, dim=1)
    return (p.bfloat16() @ (w.float() * inv_nw.float()[:, None]).bfloat16()).float()


@pytest.mark.cuda
def test_cuda_fused_pws_leaves_the_target_column_out(seed):
    """The statistics are those of each row's non-target columns, also for well-classified rows:
    each row's target class lies along the row (logit 64 against <= ~10 elsewhere), so a target
    column that is not left out would dominate lse and pws."""
    x, w, _, _, _ = provider_args(40, 3000, 256, torch.bfloat16, seed)
    labels = torch.arange(40) * 71
    w[labels] = x * 2
    inv_nx, inv_nw = inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32)
    x, w, inv_nx, inv_nw, labels = (t.cuda() for t in (x, w, inv_nx, inv_nw, labels))
    lse, pws = fused.softmax_stats(x, w, inv_nx, inv_nw, labels, 64.0, True)
    ref_lse, ref_pws = _ref_lse_pws(x, w, inv_nx, inv_nw, labels, 64.0)
    assert _row_err(pws, ref_pws) <= 2e-2  # the bf16 rounding of P'
    assert torch.allclose(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_fused_with_pws_above_512_is_the_epilogue_sweep(seed):
    """d > 512 (O does not fit the registers): the epilogue provider's sweep, unchanged."""
    args = tuple(t.cuda() for t in provider_args(50, 3001, 520, torch.bfloat16, seed))
    a = fused.softmax_stats(*args, 20.0, True)
    b = epi.softmax_stats(*args, 20.0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.cuda
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dtype,named", [(torch.bfloat16, "fused"), (torch.float32, "epilogue")],
                         ids=["bf16", "fp32"])
def test_cuda_auto_is_the_measured_provider(monkeypatch, frozen, dtype, named):
    """`auto` on a GPU with the families verified (forced here, so that a run of changed
    sources tests the same routing): the loss and gradients of the provider it names, bit for
    bit, and within the float64 reference's tolerance."""
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    x, w, y = inputs(96, 5000, 128, "cuda", dtype=dtype)
    kw = dict(scale=30.0, margin_type="cosface", margin=0.2)
    auto = run(cosine_margin_cross_entropy, x, w, y, frozen, **kw)
    ref = run(cosine_margin_cross_entropy, x, w, y, frozen, backend=named, **kw)
    for a, b in zip(auto, ref):
        assert (a is None and b is None) or torch.equal(a, b)
    exact = run(cosine_margin_cross_entropy_ref, x.double(), w.double(), y, frozen, **kw)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel_err(auto[0], exact[0]) < tol and rel_err(auto[1], exact[1]) < tol
