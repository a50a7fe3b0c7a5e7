"""ops.cpu_gemm.mm_nt: a @ b.T through oneDNN or torch.mm, exact to fp32 rounding."""
import pytest
import torch

from bct_fast.ops import cpu_gemm as _cpu_gemm


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 3), (5, 1, 513), (37, 1001, 129), (130, 64, 512)])
def test_matches_float64(seed, cpu_gemm, M, N, K):
    a, b = torch.randn(M, K), torch.randn(N, K)
    got = _cpu_gemm.mm_nt(a, b)
    ref = a.double() @ b.double().T
    bound = a.double().norm(dim=1, keepdim=True) * b.double().norm(dim=1)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert ((got.double() - ref).abs() / bound).max() < 1e-6
    got_tn = _cpu_gemm.mm_tn(a.T.contiguous(), b.T.contiguous())
    assert ((got_tn.double() - ref).abs() / bound).max() < 1e-6


def test_non_contiguous_operands_and_other_dtypes(seed, cpu_gemm):
    a, b = torch.randn(9, 40)[:, ::2], torch.randn(20, 11).T
    assert torch.allclose(_cpu_gemm.mm_nt(a, b), a @ b.T, atol=1e-5)
    a64, b64 = a.double(), b.double()
    assert torch.equal(_cpu_gemm.mm_nt(a64, b64), a64 @ b64.T)  # float64 always goes to mm


def test_probe_uses_onednn_where_torch_has_it(monkeypatch):
    """The probe must not silently fall back to mm where oneDNN exists (the ~2x CPU speedup),
    and the environment switch must turn it off."""
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert _cpu_gemm._probe()
    monkeypatch.setenv("BCT_FAST_ONEDNN", "0")
    assert not _cpu_gemm._probe()


def test_products_autograd_must_differentiate_stay_differentiable(seed, cpu_gemm):
    """oneDNN's op has no autograd formula: with grad required the product must go through mm
    (a silent None / wrong gradient otherwise)."""
    a = torch.randn(300, 128, requires_grad=True)
    b = torch.randn(400, 128, requires_grad=True)
    (_cpu_gemm.mm_nt(a, b) * 2).sum().backward()
    assert torch.allclose(a.grad, 2 * b.sum(0).expand(300, -1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(b.grad, 2 * a.sum(0).expand(400, -1), rtol=1e-5, atol=1e-4)
    a.grad = None
    _cpu_gemm.mm_tn(a.T, b.T).sum().backward()
    assert torch.allclose(a.grad, b.sum(0).expand(300, -1), rtol=1e-5, atol=1e-4)
