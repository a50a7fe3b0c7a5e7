"""CUDA kernels at sizes that exercise several class splits, partial tiles and every dtype.
Every call requests ``backend="cuda"`` so the kernels run whether or not they are the default yet.
(The device-parametrized tests in test_margin_ce.py run the default ``auto`` route on CUDA.)"""
import pytest
import torch

from test_margin_ce import check_against_reference, inputs

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_softmax",)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("B,C,d", [(1, 5003, 64), (37, 20011, 128), (64, 4099, 129), (300, 2053, 512)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_kernels_match_reference(seed, dtype, tol, B, C, d, frozen):
    x, w, y = inputs(B, C, d, "cuda", dtype=dtype, ignore_rows=(0,) if B > 1 else ())
    check_against_reference(x, w, y, frozen, tol, scale=32.0, margin_type="arcface", margin=0.4,
                            label_smoothing=0.1, backend="cuda")


@pytest.mark.cuda
def test_kernel_is_used_and_matches_chunked_path(seed):
    """The CUDA kernel and the chunked PyTorch path agree on the same CUDA tensors."""
    from bct_fast.ops import margin_softmax_cuda as cuda_provider
    from bct_fast.ops import margin_softmax_torch as torch_provider

    x, w, y = inputs(50, 3001, 256, "cuda")
    inv_nx, inv_nw = x.norm(dim=1).reciprocal(), w.norm(dim=1).reciprocal()
    assert cuda_provider.unsupported(x, w) is None
    a = cuda_provider.softmax_stats(x, w, inv_nx, inv_nw, y, 20.0, True)
    b = torch_provider.softmax_stats(x, w, inv_nx, inv_nw, y, 20.0, True)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-5)
    r = torch.rand(50, device="cuda")
    # The full lse (target column included), as the loss passes it: with lse_rest alone the
    # rescale of the SIMT provider's gx would be 1 and a missing one would go unseen.
    z_y = b[0] + torch.empty(50, device="cuda", dtype=torch.float64).uniform_(-1, 3)
    lse = torch.logaddexp(b[0], z_y)
    ga = cuda_provider.softmax_grads(x, w, inv_nx, inv_nw, y, lse, r, 20.0, True, True)
    gb = torch_provider.softmax_grads(x, w, inv_nx, inv_nw, y, lse, r, 20.0, True, True)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-6)
