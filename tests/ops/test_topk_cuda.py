"""The fused top-k kernel: odd sizes, every k regime (list capacities 64..4096), dtypes,
leave-one-out, host-streamed galleries, NaN detection. Every call requests ``backend="cuda"``,
so these tests run the kernel whether or not it is the default yet (an error, not a silent
fallback, if it cannot serve a case). The device-parametrized tests in test_topk.py run the
default (``auto``) route on CUDA."""
import numpy as np
import pytest
import torch

from bct_fast.ops import cosine_topk
from topk_reference import assert_topk_matches_reference, reference_topk

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("cosine_topk",)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("Q,N,d,k", [(1, 1, 1, 1), (1, 5000, 512, 100), (33, 1031, 129, 1031),
                                     (70, 3001, 64, 65), (5, 9000, 128, 4096), (300, 20011, 96, 10)])
def test_kernel_matches_float64_reference(seed, Q, N, d, k):
    q, g = torch.randn(Q, d), torch.randn(N, d)
    s, i = cosine_topk(q.cuda(), g.cuda(), k, backend="cuda")
    assert_topk_matches_reference(s, i, q, g, k, atol=2e-6)


def test_exact_ties_and_leave_one_out(seed):
    g = torch.randint(-2, 3, (3000, 4)).float()
    full = (g @ g.T).double()
    full.fill_diagonal_(-float("inf"))
    for k in (1, 50, 700):
        s, i = cosine_topk(g.cuda(), g.cuda(), k, normalize=False, exclude_self=True, chunk_size=1000,
                           backend="cuda")
        ri = np.lexsort((np.broadcast_to(np.arange(3000), full.shape), -full.numpy()), axis=1)[:, :k]
        assert torch.equal(i.cpu(), torch.from_numpy(ri)), k


@pytest.mark.parametrize("q_dtype,g_dtype,atol", [(torch.float32, torch.bfloat16, 2e-6),
                                                  (torch.bfloat16, torch.bfloat16, 1e-2),
                                                  (torch.float16, torch.float16, 2e-3),
                                                  (torch.float32, torch.float16, 2e-6)])
def test_low_precision_galleries(seed, q_dtype, g_dtype, atol):
    q, g = torch.randn(40, 256).to(q_dtype), torch.randn(7000, 256).to(g_dtype)
    s, i = cosine_topk(q.cuda(), g.cuda(), 100, backend="cuda")
    rs, _ = reference_topk(q.float(), g.float(), 100)  # the rounded inputs, exact arithmetic
    assert s.dtype == torch.float32
    assert torch.allclose(s.cpu().double(), rs, atol=atol)


def test_host_gallery_streamed_to_device(seed, tmp_path):
    g = torch.randn(20000, 64)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=tuple(g.shape))
    mm[:] = g.numpy()
    mm.flush()
    q = torch.randn(17, 64)
    s, i = cosine_topk(q.cuda(), np.load(tmp_path / "g.npy", mmap_mode="r"), 256, chunk_size=3000,
                       backend="cuda")
    assert s.is_cuda
    assert_topk_matches_reference(s, i, q, g, 256, atol=2e-6)
    s2, i2 = cosine_topk(q.cuda(), g, 256, chunk_size=4096, backend="cuda")  # CPU tensor gallery
    assert torch.equal(i2.cpu(), i.cpu())


def test_k_above_kernel_limit_uses_the_chunked_path(seed, monkeypatch):
    monkeypatch.setenv("BCT_FAST_UNVERIFIED_KERNELS", "1")
    q, g = torch.randn(3, 32), torch.randn(6000, 32)
    with pytest.warns(RuntimeWarning, match="above the kernel's limit"):
        s, i = cosine_topk(q.cuda(), g.cuda(), 5000)
    assert_topk_matches_reference(s, i, q, g, 5000, atol=2e-6)
    with pytest.raises(ValueError, match="backend: .*above the kernel's limit"):
        cosine_topk(q.cuda(), g.cuda(), 5000, backend="cuda")


def test_nan_is_reported(seed):
    g = torch.randn(5000, 64, device="cuda")
    g[4321, 7] = float("nan")
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(4, 64, device="cuda"), g, 10, backend="cuda")


def test_cupy_arrays_and_an_independent_cupy_reference(seed):
    """cupy in (viewed through DLPack, no copy); cupy's own matmul + argsort as a second
    reference for the kernel's top-k, independent of torch."""
    cp = pytest.importorskip("cupy")
    q = cp.random.standard_normal((37, 96), dtype=cp.float32)
    g = cp.random.standard_normal((5003, 96), dtype=cp.float32)
    s, i = cosine_topk(q, g, 50, backend="cuda")
    qn = q / cp.linalg.norm(q, axis=1, keepdims=True)
    gn = g / cp.linalg.norm(g, axis=1, keepdims=True)
    full = (qn.astype(cp.float64) @ gn.astype(cp.float64).T)
    ref_s = -cp.sort(-full, axis=1)[:, :50]
    assert cp.allclose(cp.asarray(s), ref_s, atol=2e-6)
    got = cp.take_along_axis(full, cp.asarray(i), axis=1)
    assert cp.allclose(got, ref_s, atol=2e-6)
