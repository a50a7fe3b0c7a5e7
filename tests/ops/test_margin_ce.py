"""cosine_margin_cross_entropy against the float64 reference, on every available device."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bct_fast.ops.reference import cosine_margin_cross_entropy_ref
from bct_fast.ops import cosine_margin_cross_entropy
from bct_fast.testing import available_devices

# The kernel families this file's CUDA cases exercise (``auto`` picks the SIMT kernels when
# BCT_FAST_UNVERIFIED_KERNELS=1): a GPU run verifies a family only when every CUDA test that
# names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_softmax",)

MARGINS = [("none", 0.0), ("cosface", 0.35), ("arcface", 0.5), ("combined", (1.0, 0.3, 0.2)),
           ("combined", (1.2, 0.1, 0.05))]


def run(fn, x, w, y, frozen, **kw):
    """Loss value and gradients of ``fn`` on fresh leaf copies of the inputs."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(not frozen)
    loss = fn(x, w, y, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad, (None if frozen else w.grad)


def rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """Max abs error relative to the reference's largest entry (floored: C = 1 has zero grads)."""
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(floor))


def inputs(B, C, d, device, dtype=torch.float32, ignore_rows=()):
    x = torch.randn(B, d, device=device).to(dtype)
    w = torch.randn(C, d, device=device).to(dtype)
    y = torch.randint(0, C, (B,), device=device)
    for r in ignore_rows:
        if r < B:
            y[r] = -100
    return x, w, y


def check_against_reference(x, w, y, frozen, tol, **kw):
    """Error vs the float64 reference below ``tol``, or at most 2x the error of the naive
    PyTorch computation in the inputs' own precision (flash-attention's rule: a fused kernel may
    not be less accurate than the unfused math it replaces)."""
    got = run(cosine_margin_cross_entropy, x, w, y, frozen, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    ref = run(cosine_margin_cross_entropy_ref, x, w, y, frozen, **ref_kw)
    naive = run(cosine_margin_cross_entropy_ref, x.float(), w.float(), y, frozen,
                compute_dtype=torch.float32, **ref_kw) if x.dtype == torch.float32 else (None,) * 3
    for name, a, b, c in zip(("loss", "grad_embeddings", "grad_weight"), got, ref, naive):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), name
        bound = tol if c is None else max(tol, 2 * rel_err(c, b))
        assert rel_err(a, b) < bound, f"{name}: rel err {rel_err(a, b):.2e} >= {bound:.1e}"


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("margin_type,margin", MARGINS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(seed, device, margin_type, margin, frozen, reduction):
    x, w, y = inputs(9, 517, 129, device, ignore_rows=(3,))
    check_against_reference(x, w, y, frozen, 2e-5, scale=30.0, margin_type=margin_type,
                            margin=margin, reduction=reduction, chunk_size=100)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("B,C,d", [(1, 1, 1), (1, 33, 64), (3, 1, 17), (5, 257, 128), (33, 70, 512), (2, 1000, 3)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_odd_sizes(seed, device, B, C, d, frozen):
    x, w, y = inputs(B, C, d, device)
    # d = 1 puts every cosine at +-1, where the exact ArcFace derivative is infinite.
    margin_type = "cosface" if d == 1 else "arcface"
    check_against_reference(x, w, y, frozen, 2e-5, scale=16.0, margin_type=margin_type, margin=0.3,
                            chunk_size=7)


@pytest.mark.parametrize("margin_type,margin", [("cosface", 0.35), ("arcface", 0.5)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_cpu_products_large_enough_for_onednn(seed, cpu_gemm, margin_type, margin, frozen):
    """Chunks above _cpu_gemm's size cut-off, once through oneDNN and once through torch.mm."""
    x, w, y = inputs(67, 1000, 96, "cpu", ignore_rows=(5,))
    check_against_reference(x, w, y, frozen, 2e-5, scale=30.0, margin_type=margin_type, margin=margin)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("margin_type,margin", MARGINS[:3])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_label_smoothing(seed, device, margin_type, margin, frozen):
    x, w, y = inputs(6, 211, 40, device, ignore_rows=(0,))
    check_against_reference(x, w, y, frozen, 2e-5, scale=20.0, margin_type=margin_type,
                            margin=margin, label_smoothing=0.15, chunk_size=50)


@pytest.mark.parametrize("device", available_devices())
def test_straight_through_arcface_grad(seed, device):
    x, w, y = inputs(7, 90, 31, device)
    kw = dict(scale=64.0, margin_type="arcface", margin=0.5, arcface_grad="straight_through")
    check_against_reference(x, w, y, False, 2e-5, **kw)
    exact = run(cosine_margin_cross_entropy, x, w, y, False, **{**kw, "arcface_grad": "exact"})
    st = run(cosine_margin_cross_entropy, x, w, y, False, **kw)
    assert torch.equal(exact[0], st[0])  # same forward
    assert rel_err(exact[1], st[1]) > 1e-3  # different gradient


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("m", [0.5, 1.2])
def test_arcface_fallback_region(seed, device, m):
    """Targets whose angle + m passes pi use the monotonic fallback c - m sin m (both sides)."""
    B, C, d = 6, 50, 16
    w = torch.randn(C, d, device=device)
    y = torch.randint(0, C, (B,), device=device)
    # Put half the rows nearly opposite their class row (theta close to pi), half near it.
    x = F.normalize(w[y], dim=1) * torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], device=device)[:, None]
    x = x + 0.05 * torch.randn(B, d, device=device)  # |noise| ~ 0.2: theta stays > pi - 1.2
    cos_t = F.cosine_similarity(x, w[y])
    assert (torch.acos(cos_t[:3]) + m > math.pi).all()
    check_against_reference(x, w, y, False, 2e-5, scale=32.0, margin_type="arcface", margin=m)


@pytest.mark.parametrize("device", available_devices())
def test_margin_zero_equals_plain_cross_entropy(seed, device):
    x, w, y = inputs(8, 60, 12, device)
    for mt in ("cosface", "arcface"):
        a = cosine_margin_cross_entropy(x, w, y, scale=10.0, margin_type=mt, margin=0.0)
        b = F.cross_entropy(10.0 * F.normalize(x) @ F.normalize(w).T, y)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", available_devices())
def test_all_rows_ignored(device):
    x, w, _ = inputs(4, 10, 8, device)
    y = torch.full((4,), -1, device=device)
    loss, gx, gw = run(cosine_margin_cross_entropy, x, w, y, False, ignore_index=-1)
    assert loss.item() == 0.0 and not gx.any() and not gw.any()


def test_gradcheck_float64(seed):
    """Double-precision gradcheck of the chunked path, for each margin type and both modes."""
    for margin_type, margin in MARGINS:
        for frozen in (False, True):
            x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
            w = torch.randn(7, 5, dtype=torch.float64, requires_grad=not frozen)
            y = torch.tensor([0, 6, 3])
            fn = lambda a, b: cosine_margin_cross_entropy(  # noqa: E731
                a, b, y, scale=4.0, margin_type=margin_type, margin=margin, label_smoothing=0.1,
                chunk_size=3, reduction="none")
            assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_low_precision_error_at_most_twice_torch(seed, device, dtype, frozen):
    """flash-attention rule: our error vs float64 <= 2x the same-dtype plain-PyTorch error."""
    x, w, y = inputs(16, 300, 64, device, dtype=dtype)
    check_low_precision(x, w, y, frozen, scale=32.0, margin_type="cosface", margin=0.35)


def check_low_precision(x, w, y, frozen, **kw):
    """Loss and gradients vs float64: error <= 2x that of the naive computation in x's dtype."""
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    ref = run(cosine_margin_cross_entropy_ref, x, w, y, frozen, **ref_kw)

    def plain_torch(a, b, t, **k):  # the naive same-dtype computation (cosface form; margin 0 for others)
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
        logits = logits - k["margin"] * F.one_hot(t, b.shape[0]).to(logits.dtype)
        return F.cross_entropy(k["scale"] * logits.float(), t)

    peer = run(plain_torch, x, w, y, frozen, **ref_kw)
    ours = run(cosine_margin_cross_entropy, x, w, y, frozen, **kw)
    for name, o, p, r in zip(("loss", "grad_embeddings", "grad_weight"), ours, peer, ref):
        if r is None:
            continue
        assert o.dtype == (torch.float32 if name == "loss" else x.dtype)
        err_o, err_p = rel_err(o, r), rel_err(p, r)
        assert err_o <= 2 * err_p + 1e-6, f"{name}: ours {err_o:.2e} vs torch {err_p:.2e}"
    return ours


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_bf16_tensor_core_route(seed, monkeypatch, device, frozen):
    """bf16 on CUDA: the torch provider runs every GEMM on the bf16 tensor cores (the epilogue
    chunk loop with the kernels' PyTorch twin), forced here on CPU tensors (where the products
    upcast: the same arithmetic). Odd sizes over 3 class chunks: the bf16 rule against float64,
    and well-classified rows keep their small gradient."""
    from bct_fast.ops import margin_softmax_epilogue as mse
    from bct_fast.ops import margin_softmax_torch as mst

    taken, real = [], mse.mm_f32
    monkeypatch.setattr(mse, "mm_f32", lambda a, b: taken.append(a.dtype) or real(a, b))
    if device == "cpu":
        monkeypatch.setattr(mst, "tensor_core_blocks", lambda a, b: a.dtype == b.dtype == torch.bfloat16)
    x, w, y = inputs(33, 700, 40, device, dtype=torch.bfloat16)
    kw = dict(scale=32.0, margin_type="cosface", margin=0.35, chunk_size=256, backend="torch")
    check_low_precision(x, w, y, frozen, **kw)
    # Every product (logits, and P @ W, P.T @ X or the frozen forward's e @ W) on bf16 operands.
    assert taken and set(taken) == {torch.bfloat16}
    # 3 chunks. Frozen: the forward's S and e @ W (its backward reuses them); trainable: the
    # forward's S, then S, P @ W and P.T @ X.
    assert len(taken) == (3 * 2 if frozen else 3 + 3 * 3)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["xw", "x", "w"])
def test_bf16_tensor_core_route_is_the_epilogue_loop_with_the_twin(seed, monkeypatch, device, frozen, need):
    """The route's sweeps are the epilogue provider's loop with the PyTorch twin, in the torch
    provider's chunks: the same tensors (bitwise on a CPU; a GPU may pick other GEMM kernels for
    the two calls' allocations, so within fp32 rounding there)."""
    from bct_fast.ops import margin_softmax_epilogue as mse
    from bct_fast.ops import margin_softmax_torch as mst
    from bct_fast.ops.rows import inv_row_norms

    if device == "cpu":
        monkeypatch.setattr(mst, "tensor_core_blocks", lambda a, b: a.dtype == b.dtype == torch.bfloat16)
    x, w, y = inputs(9, 517, 24, device, dtype=torch.bfloat16)
    args = (x, w, inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32), y)
    same = (lambda a, b: torch.equal(a, b)) if device == "cpu" else (
        lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7))
    lse, pws = mst.softmax_stats(*args, 20.0, frozen, 200)
    lse_e, pws_e = mse.softmax_stats(*args, 20.0, frozen, 200, epilogue=mse.TORCH_EPILOGUE)
    assert same(lse, lse_e) and same(pws, pws_e)
    row_coef = torch.rand(9, device=device)
    got = mst.softmax_grads(*args, lse, row_coef, 20.0, *need, 200)
    want = mse.softmax_grads(*args, lse, row_coef, 20.0, *need, 200, epilogue=mse.TORCH_EPILOGUE)
    assert all(same(a, b) for a, b in zip(got, want))


def test_mixed_dtypes_keep_parameter_dtype(seed):
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float32, requires_grad=True)
    y = torch.randint(0, 40, (5,))
    cosine_margin_cross_entropy(x, w, y, scale=8.0).backward()
    assert w.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", available_devices())
def test_normalization_backward_rows_is_row_wise(seed, device):
    """Against float64 autograd through t / |t|, and the same result (to fp32 rounding: a GPU's
    row reductions may order their sums by shape) for every chunk size (the GPU default takes
    ~16M elements a chunk, the CPU one 4096 rows)."""
    from bct_fast.ops import normalization_backward_rows
    from bct_fast.ops.rows import inv_row_norms

    t, g = torch.randn(5000, 24, device=device), torch.randn(5000, 24, device=device)
    inv = inv_row_norms(t)
    one = normalization_backward_rows(t, inv, g.clone())
    for chunk in (1, 7, 4096, 10**6):
        assert torch.allclose(normalization_backward_rows(t, inv, g.clone(), chunk), one, rtol=1e-6, atol=1e-7)
    t64 = t.double().requires_grad_(True)
    (t64 / t64.norm(dim=1, keepdim=True)).backward(g.double())
    assert torch.allclose(one.double(), t64.grad, rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_result(seed):
    x, w, y = inputs(10, 333, 20, "cpu")
    a = run(cosine_margin_cross_entropy, x, w, y, False, scale=20.0, chunk_size=1)
    b = run(cosine_margin_cross_entropy, x, w, y, False, scale=20.0, chunk_size=333)
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-5


def test_frozen_one_pass_only_when_a_backward_follows(seed, monkeypatch):
    """The frozen-classifier forward fuses the gradient sweep only under grad mode."""
    import bct_fast.ops.margin_softmax_torch as chunked

    calls = []
    real = chunked.softmax_stats
    monkeypatch.setattr(chunked, "softmax_stats", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    x, w, y = inputs(4, 30, 8, "cpu")
    x.requires_grad_(True)
    with torch.no_grad():
        cosine_margin_cross_entropy(x, w, y)
    cosine_margin_cross_entropy(x, w, y).backward()
    assert calls == [False, True]  # with_pws: no fused sweep under no_grad, fused otherwise
