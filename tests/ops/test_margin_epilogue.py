"""The epilogue provider (bct_fast.ops.margin_softmax_epilogue): its chunk loop with the PyTorch
twin of the kernels on the CPU (fp32 and bf16 operands) against the float64 reference, how
`choose` routes backend="epilogue", and (marked cuda) the real kernels on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bct_fast.ops import cosine_margin_cross_entropy, providers
from bct_fast.ops import margin_softmax_epilogue as epi
from bct_fast.ops import margin_softmax_torch
from bct_fast.ops.reference import cosine_margin_cross_entropy_ref, margin_target_ref
from bct_fast.ops.rows import inv_row_norms
from test_margin_ce import inputs, rel_err, run
import test_providers

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_epilogue",)

CUDA = torch.device("cuda")  # only its type is read by choose: no GPU needed
MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
# (B, C, d, chunk): B=1, C not a multiple of the chunk, a single partial chunk, chunk 1.
SHAPES = [(1, 37, 16, 8), (9, 517, 129, 100), (5, 70, 33, 256), (4, 13, 8, 1)]


def labels_with_ignored(B, C, g):
    y = torch.randint(0, C, (B,), generator=g)
    if B > 1:
        y[1] = -1  # ignored (ignore_index=-1)
    return y


@pytest.mark.parametrize("margin_type,margin", MARGINS)
@pytest.mark.parametrize("B,C,d,chunk", SHAPES)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_fp32_operands_match_float64(seed, margin_type, margin, B, C, d, chunk, frozen):
    """Loss and gradients within 1e-5 (relative to the largest reference entry) of float64."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(B, d, generator=g), torch.randn(C, d, generator=g)
    y = labels_with_ignored(B, C, g)
    kw = dict(scale=30.0, margin_type=margin_type, margin=margin, ignore_index=-1)
    got = run(cosine_margin_cross_entropy, x, w, y, frozen, chunk_size=chunk, backend="epilogue", **kw)
    ref = run(cosine_margin_cross_entropy_ref, x.double(), w.double(), y, frozen, **kw)
    for name, a, b in zip(("loss", "grad_embeddings", "grad_weight"), got, ref):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all() and a.dtype == torch.float32, name
        assert rel_err(a, b) < 1e-5, f"{name}: rel err {rel_err(a, b):.2e}"


def plain_bf16(x, w, y, *, scale, margin_type, margin, ignore_index):
    """The naive bf16 computation: bf16 normalize and matmul (bf16 logits, as under autocast),
    the margin and the cross-entropy in fp32."""
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).float()
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y))
    f = margin_target_ref(cos.gather(1, safe[:, None])[:, 0], margin_type, margin, False)
    logits = (scale * cos).scatter(1, safe[:, None], (scale * f)[:, None])
    return F.cross_entropy(logits, torch.where(valid, y, torch.full_like(y, -100)), ignore_index=-100)


@pytest.mark.parametrize("margin_type,margin", MARGINS)
@pytest.mark.parametrize("B,C,d,chunk", [(1, 37, 16, 8), (16, 300, 64, 128), (9, 517, 129, 100)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_bf16_operands_at_most_twice_plain_torch(seed, margin_type, margin, B, C, d, chunk, frozen):
    """bf16 inputs (bf16 GEMM operands, e / p blocks in bf16): error vs float64 <= 2x the error
    of the plain bf16 PyTorch computation (flash-attention's rule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).bfloat16()
    w = torch.randn(C, d, generator=g).bfloat16()
    y = labels_with_ignored(B, C, g)
    kw = dict(scale=32.0, margin_type=margin_type, margin=margin, ignore_index=-1)
    ours = run(cosine_margin_cross_entropy, x, w, y, frozen, chunk_size=chunk, backend="epilogue", **kw)
    peer = run(plain_bf16, x, w, y, frozen, **kw)
    ref = run(cosine_margin_cross_entropy_ref, x.double(), w.double(), y, frozen, **kw)
    for name, o, p, r in zip(("loss", "grad_embeddings", "grad_weight"), ours, peer, ref):
        if r is None:
            continue
        assert o.dtype == (torch.float32 if name == "loss" else torch.bfloat16), name
        err_o, err_p = rel_err(o, r), rel_err(p, r)
        assert err_o <= 2 * err_p + 1e-6, f"{name}: ours {err_o:.2e} vs plain bf16 {err_p:.2e}"


# Target cosines for which the margin logit is ~0.46 (scale 32, C = 300, d = 256: losses ~1e-3).
WELL_CLASSIFIED = [("none", 0.0, 0.457), ("cosface", 0.35, 0.807), ("arcface", 0.5, 0.827)]


@pytest.mark.parametrize("margin_type,margin,target_cos", WELL_CLASSIFIED)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_bf16_well_classified_rows_keep_their_small_gradient(seed, margin_type, margin, target_cos, frozen):
    """Rows with losses of ~1e-3: the gradient is (p_y - 1) ~ -1e-3 at the target. A
    bf16-rounded p_y ~ 1 (error 2^-9) in the GEMM blocks would make that gradient mostly
    rounding error (it did: 5-100x the plain bf16 error); the target column is added in fp32.
    Smaller losses: test_margin_ce_precision.py (fp32)."""
    g = torch.Generator().manual_seed(seed)
    B, C, d = 8, 300, 256
    y = torch.randint(0, C, (B,), generator=g)
    w = torch.randn(C, d, generator=g)
    wy = F.normalize(w[y], dim=1)
    u = torch.randn(B, d, generator=g)
    u = F.normalize(u - (u * wy).sum(1, keepdim=True) * wy, dim=1)  # orthogonal to w_hat_y
    x = target_cos * wy + (1 - target_cos ** 2) ** 0.5 * u
    x, w = x.bfloat16(), w.bfloat16()
    kw = dict(scale=32.0, margin_type=margin_type, margin=margin, ignore_index=-1)
    ref = run(cosine_margin_cross_entropy_ref, x.double(), w.double(), y, frozen, **kw)
    assert 1e-5 < ref[0] < 0.05, f"the construction must give well-classified rows ({float(ref[0]):.1e})"
    ours = run(cosine_margin_cross_entropy, x, w, y, frozen, chunk_size=128, backend="epilogue", **kw)
    peer = run(plain_bf16, x, w, y, frozen, **kw)
    for name, o, p, r in zip(("loss", "grad_embeddings", "grad_weight"), ours, peer, ref):
        if r is None:
            continue
        err_o, err_p = rel_err(o, r, floor=0.0), rel_err(p, r, floor=0.0)
        assert err_o <= 2 * err_p, f"{name}: ours {err_o:.2e} vs plain bf16 {err_p:.2e}"


def provider_args(B=7, C=90, d=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    w = torch.randn(C, d, generator=g).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[0] = -1
    inv_nx, inv_nw = inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32)
    return x, w, inv_nx, inv_nw, labels


@pytest.mark.parametrize("chunk", [1, 7, 32, 90, 0])
def test_provider_matches_the_torch_provider(chunk):
    """Both sweeps, every output combination, against margin_softmax_torch (fp32)."""
    args = provider_args()
    scale = 12.0
    for with_pws in (False, True):
        a = epi.softmax_stats(*args, scale, with_pws, chunk)
        b = margin_softmax_torch.softmax_stats(*args, scale, with_pws, chunk)
        for u, v in zip(a, b):
            assert u.shape == v.shape and torch.allclose(u, v, rtol=1e-5, atol=1e-6)
    lse = b[0]
    row_coef = torch.rand(7)
    row_coef[3] = 0.0
    for need_x, need_w in ((True, True), (True, False), (False, True), (False, False)):
        a = epi.softmax_grads(*args, lse, row_coef, scale, need_x, need_w, chunk)
        b = margin_softmax_torch.softmax_grads(*args, lse, row_coef, scale, need_x, need_w, chunk)
        for u, v in zip(a, b):
            assert u.shape == v.shape and torch.allclose(u, v, rtol=1e-5, atol=1e-6)


def test_rows_with_all_logits_neg_inf():
    """C=1 whose only class is each row's target (left out of the statistics): lse = -inf, pws
    NaN-free after the caller's combination; the loss is exactly 0 with zero gradients."""
    x, w = torch.randn(2, 4), torch.randn(1, 4)
    inv_nx, inv_nw = inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32)
    lse, _ = epi.softmax_stats(x, w, inv_nx, inv_nw, torch.tensor([0, 0]), 8.0, False)
    assert torch.isneginf(lse).all()
    for frozen in (False, True):
        loss, gx, gw = run(cosine_margin_cross_entropy, x, w, torch.tensor([0, 0]), frozen, scale=8.0,
                           backend="epilogue")
        assert float(loss) == 0.0 and torch.equal(gx, torch.zeros_like(gx))
        assert frozen or torch.equal(gw, torch.zeros_like(gw))


def test_epilogue_is_injectable():
    """The loop calls the injected epilogue once per chunk, with the chunk's offset and width."""
    calls = []

    def stats(scores, inv_nx, inv_nw, labels, c0, scale, m, l, e_out=None, alpha_out=None):
        calls.append(("stats", c0, scores.shape[1], inv_nw.shape[0], e_out is not None))
        epi.TORCH_EPILOGUE.stats(scores, inv_nx, inv_nw, labels, c0, scale, m, l, e_out,
                                 alpha_out)

    def grads(scores, inv_nx, inv_nw, labels, c0, scale, lse, row_coef, p_out=None, pw_out=None):
        calls.append(("grads", c0, scores.shape[1], p_out is not None, pw_out is not None))
        epi.TORCH_EPILOGUE.grads(scores, inv_nx, inv_nw, labels, c0, scale, lse, row_coef,
                                 p_out, pw_out)

    args = provider_args()
    ep = epi.Epilogue(stats, grads, "spy")
    lse, _ = epi.softmax_stats(*args, 5.0, True, 40, epilogue=ep)
    epi.softmax_grads(*args, lse, torch.ones(7), 5.0, False, True, 40, epilogue=ep)
    assert calls == [("stats", 0, 40, 40, True), ("stats", 40, 40, 40, True), ("stats", 80, 10, 10, True),
                     ("grads", 0, 40, True, False), ("grads", 40, 40, True, False),
                     ("grads", 80, 10, True, False)]


def test_chunk_width_keeps_the_score_block_near_64_mib():
    assert epi.epilogue_chunk(1024, 1_000_000) == 16384  # 16M fp32 scores = 64 MiB (measured, H200)
    assert epi.epilogue_chunk(1000, 1_000_000) % 256 == 0
    assert epi.epilogue_chunk(100_000, 10**6) == 256  # at least one GEMM-friendly width
    assert epi.epilogue_chunk(1_000_000, 10**6) == 256
    assert epi.epilogue_chunk(1, 300) == 300 and epi.epilogue_chunk(3, 1) == 1


# ---- routing -----------------------------------------------------------------------------------

compiled = test_providers.compiled  # fixture: the CUDA kernels "compiled", none verified


def epi_ok():
    return None


def test_epilogue_backend_on_cpu_runs_the_twin_loop():
    c = providers.choose("margin_softmax", torch.device("cpu"), "epilogue", lambda: None, epi_ok)
    assert c.provider == "epilogue" and "twin" in c.reason
    with pytest.raises(ValueError, match="backend: 'epilogue' is not available for cosine_topk"):
        providers.choose("cosine_topk", torch.device("cpu"), "epilogue", lambda: None)


@pytest.mark.parametrize("dtype,why", [(torch.float16, "float32 or bfloat16"), (torch.float64, "float64")])
def test_epilogue_backend_refuses_unsupported_dtypes(dtype, why):
    x, w, y = inputs(3, 10, 4, "cpu", dtype=dtype)
    with pytest.raises(ValueError, match=f"backend: the epilogue provider of margin_softmax cannot serve.*{why}"):
        cosine_margin_cross_entropy(x, w, y, backend="epilogue")


def test_epilogue_backend_on_cuda_needs_compiled_kernels(monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: False)
    with pytest.raises(ValueError, match="backend: 'epilogue' needs the CUDA kernels"):
        providers.choose("margin_softmax", CUDA, "epilogue", lambda: None, epi_ok)


def test_auto_never_picks_the_unverified_epilogue(compiled, monkeypatch):
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: None, epi_ok)
    assert c.provider == "torch"
    monkeypatch.setenv(providers.UNVERIFIED_ENV, "1")  # selects the SIMT kernels, not the epilogue
    assert providers.choose("margin_softmax", CUDA, "auto", lambda: None, epi_ok).provider == "cuda"
    assert providers.choose("margin_softmax", CUDA, "epilogue", lambda: None, epi_ok).provider == "epilogue"


def test_auto_picks_the_epilogue_once_its_family_is_verified(compiled, monkeypatch):
    monkeypatch.setattr(providers, "_verified", lambda family: family == "margin_epilogue")
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: None, epi_ok)
    assert c.provider == "epilogue" and not c.warn
    bf16_only = lambda: providers.Unsupported("fp16")  # noqa: E731
    assert providers.choose("margin_softmax", CUDA, "auto", lambda: None, bf16_only).provider == "torch"
    assert providers.choose("margin_softmax", torch.device("cpu"), "auto", lambda: None, epi_ok).provider == "torch"


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,C,d", [(1, 5003, 64), (37, 20011, 128), (300, 2053, 512)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_cuda_epilogue_matches_reference(seed, dtype, B, C, d, frozen):
    """The real provider (cuBLAS GEMMs + the epilogue kernels) via backend="epilogue": fp32 within
    2e-5 of float64, bf16 within 2x the plain bf16 PyTorch error."""
    x, w, y = inputs(B, C, d, "cuda", dtype=dtype)
    if B > 1:
        y[0] = -1
    kw = dict(scale=32.0, margin_type="arcface", margin=0.4, ignore_index=-1)
    ours = run(cosine_margin_cross_entropy, x, w, y, frozen, backend="epilogue", chunk_size=1000, **kw)
    ref = run(cosine_margin_cross_entropy_ref, x.double(), w.double(), y, frozen, **kw)
    peer = run(plain_bf16, x, w, y, frozen, **kw) if dtype == torch.bfloat16 else (None,) * 3
    for name, o, r, p in zip(("loss", "grad_embeddings", "grad_weight"), ours, ref, peer):
        if r is None:
            continue
        bound = 2e-5 if p is None else 2 * rel_err(p, r) + 1e-6
        assert rel_err(o, r) <= bound, f"{name}: {rel_err(o, r):.2e} > {bound:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_match_their_twin(seed, dtype):
    """The same chunk loop on the same CUDA tensors with the kernels and with the twin."""
    args = tuple(t.cuda() for t in provider_args(50, 3001, 256, dtype, seed))
    out = {}
    for ep in (epi.CUDA_EPILOGUE, epi.TORCH_EPILOGUE):
        lse, pws = epi.softmax_stats(*args, 20.0, True, 1024, epilogue=ep)
        r = torch.rand(50, device="cuda")
        torch.manual_seed(seed)
        gx, gw = epi.softmax_grads(*args, lse, r.fill_(0.5), 20.0, True, True, 1024, epilogue=ep)
        out[ep.name] = (lse, pws, gx, gw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for name, a, b in zip(("lse", "pws", "gx", "gw"), out["cuda"], out["torch"]):
        assert torch.allclose(a, b, **tol), name
