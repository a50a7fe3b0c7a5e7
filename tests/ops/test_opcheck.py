"""torch.library checks on every registered op and device, and a torch.compile trace."""
import pytest
import torch

import bct_fast.ops  # noqa: F401  (registers the ops)
from bct_fast.ops import cosine_margin_cross_entropy
from bct_fast.testing import available_devices

# The kernel families this file's CUDA cases exercise (``auto`` picks the SIMT kernels when
# BCT_FAST_UNVERIFIED_KERNELS=1): a GPU run verifies a family only when every CUDA test that
# names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_softmax",)


# On CUDA the op runs once through the default route and once through the kernels (requested).
DEVICE_BACKENDS = [(d, b) for d in available_devices() for b in (("auto", "cuda") if d == "cuda" else ("auto",))]


def op_args(device, dtype=torch.float32):
    B, C, d = 5, 37, 9
    x = torch.randn(B, d, device=device, dtype=dtype)
    w = torch.randn(C, d, device=device, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_nx = x.to(acc).norm(dim=1).reciprocal()
    inv_nw = w.to(acc).norm(dim=1).reciprocal()
    labels = torch.tensor([0, 36, -1, 5, 20], device=device)
    return x, w, inv_nx, inv_nw, labels


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("with_pws", [False, True])
def test_opcheck_softmax_stats(device, backend, with_pws):
    torch.library.opcheck(torch.ops.bct_fast.softmax_stats.default,
                          (*op_args(device), 8.0, with_pws, 10, backend))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("need_x,need_w", [(True, True), (True, False), (False, True)])
def test_opcheck_softmax_grads(device, backend, need_x, need_w):
    x, w, inv_nx, inv_nw, labels = op_args(device)
    lse, _ = torch.ops.bct_fast.softmax_stats(x, w, inv_nx, inv_nw, labels, 8.0, False, 0)
    row_coef = torch.rand(x.shape[0], device=device)
    torch.library.opcheck(torch.ops.bct_fast.softmax_grads.default,
                          (x, w, inv_nx, inv_nw, labels, lse, row_coef, 8.0, need_x, need_w, 10,
                           backend))


@pytest.mark.parametrize("device", available_devices())
def test_torch_compile_traces_the_loss(device):
    x = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(50, 16, device=device, requires_grad=True)
    y = torch.randint(0, 50, (6,), device=device)

    def step(a, b):
        return cosine_margin_cross_entropy(a, b, y, scale=16.0, margin_type="arcface", margin=0.4)

    eager = step(x, w)
    ge = torch.autograd.grad(eager, (x, w))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, w)
    gc = torch.autograd.grad(compiled, (x, w))
    assert torch.allclose(eager, compiled, rtol=1e-5)
    for a, b in zip(ge, gc):  # torch 2.11 once gave all-zero compiled gradients here
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
