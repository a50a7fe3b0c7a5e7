"""Autocast stays outside the ops (bct_fast/_core/autocast.py): inside a ``torch.autocast``
region the loss, its gradients and the search give the same bits as outside it. Before, the
loss's logits came out of autocast's bf16 matmuls (gradients ~1 % off) and the CPU search
refused its own bf16 score blocks (TypeError)."""
import pytest
import torch

from bct_fast.ops import cosine_margin_cross_entropy, cosine_topk
from bct_fast.ops.topk_epilogue import cosine_topk_epilogue
from bct_fast.testing import available_devices

# On a GPU run (BCT_FAST_UNVERIFIED_KERNELS=1) the CUDA cases' `auto` runs the SIMT kernels of
# both ops (benchmarks/verify_gpu_run.py attributes these tests to them).
KERNEL_FAMILIES = ("margin_softmax", "cosine_topk")


def _autocast(device):
    return torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16)


def _loss_and_grads(x, w, y, frozen, **kw):
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(not frozen)
    loss = cosine_margin_cross_entropy(x, w, y, **kw)
    return (loss, *torch.autograd.grad(loss, [x] if frozen else [x, w]))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_loss_ignores_autocast(seed, cpu_gemm, device, frozen, backward_inside):
    """fp32 inputs, chunked over classes (and through the plain torch.mm route of ``cpu_gemm``,
    which autocast rewrites): the same loss and gradients inside an autocast region, with the
    backward inside it or after it."""
    x, w = torch.randn(40, 96, device=device), torch.randn(3000, 96, device=device)
    # Distinct labels: the weight gradient's target rows are then each added once (index_add_ on
    # a GPU adds repeated rows in any order, which would make bitwise equality a matter of luck).
    y = torch.randperm(3000, device=device)[:40]
    kw = dict(scale=64.0, margin_type="arcface", margin=0.5, chunk_size=700)
    ref = _loss_and_grads(x, w, y, frozen, **kw)
    if backward_inside:
        with _autocast(device):
            got = _loss_and_grads(x, w, y, frozen, **kw)
    else:
        with _autocast(device):
            loss = cosine_margin_cross_entropy(x.requires_grad_(True), w.requires_grad_(not frozen), y, **kw)
        got = (loss, *torch.autograd.grad(loss, [x] if frozen else [x, w]))
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", available_devices())
def test_search_ignores_autocast(seed, cpu_gemm, cpu_select, device):
    q, g = torch.randn(50, 64, device=device), torch.randn(3000, 64, device=device)
    ref = cosine_topk(q, g, 10, chunk_size=700)
    with _autocast(device):
        got = cosine_topk(q, g, 10, chunk_size=700)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_epilogue_search_ignores_autocast(seed):
    q, g = torch.randn(30, 64), torch.randn(2000, 64)
    ref = cosine_topk_epilogue(q, g, 7, chunk_size=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cosine_topk_epilogue(q, g, 7, chunk_size=500)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_autocast_is_back_on_after_the_call():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosine_topk(torch.randn(3, 8), torch.randn(20, 8), 2)
        assert torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype == torch.bfloat16
