"""Both CUDA kernel families on small, odd shapes: the set benchmarks/gpu_session.sh runs under
compute-sanitizer (memcheck, racecheck), where every kernel launch is slow. Each case still checks
its result against the float64 reference, so a sanitizer run is also a correctness run."""
import pytest
import torch

from bct_fast.ops import cosine_topk
from test_margin_ce import check_against_reference, inputs
from topk_reference import assert_topk_matches_reference

# The kernel families this file's CUDA tests exercise: a GPU run verifies a family only when
# every CUDA test that names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("margin_softmax", "cosine_topk")

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("B,C,d", [(1, 1, 1), (3, 33, 31), (33, 300, 65)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_margin_kernels_small(seed, B, C, d, frozen):
    x, w, y = inputs(B, C, d, "cuda")
    check_against_reference(x, w, y, frozen, 2e-5, scale=16.0, margin_type="cosface", margin=0.2,
                            backend="cuda")


@pytest.mark.parametrize("Q,N,d,k", [(1, 1, 1, 1), (3, 70, 33, 70), (5, 300, 17, 65), (2, 600, 8, 300)])
def test_topk_kernel_small(seed, Q, N, d, k):
    q, g = torch.randn(Q, d), torch.randn(N, d)
    s, i = cosine_topk(q.cuda(), g.cuda(), k, backend="cuda")
    assert_topk_matches_reference(s, i, q, g, k, atol=2e-6)


def test_topk_kernel_small_exclude_self(seed):
    g = torch.randn(90, 24)
    s, i = cosine_topk(g.cuda(), g.cuda(), 89, exclude_self=True, chunk_size=45, backend="cuda")
    assert_topk_matches_reference(s, i, g, g, 89, atol=2e-6, exclude_self=True)
