"""Host and GPU inputs mixed in one call of the user API: the work lands on one device, results
come back where the caller's queries live, and they equal those of the same call on the CPU.

CUDA only (they run on a GPU lease). They check the API's device handling around the search,
whose default route they take: once the search kernels are verified that route is theirs, so
these tests name both search families (a default must not be flipped while the API around it
fails). Found by reading the CUDA-only paths (2026-11-26, no GPU that day)."""
import numpy as np
import pytest
import torch

from bct_fast.gallery import GalleryIndex
from bct_fast.metrics import tar_at_far
from bct_fast.ops import cosine_topk
from bct_fast.search import FlatIndex

KERNEL_FAMILIES = ("cosine_topk", "topk_epilogue")

pytestmark = pytest.mark.cuda


def _rows(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_gpu_gallery_index_takes_host_queries(seed):
    """A CUDA index searched with CPU tensors or numpy: the search runs on the GPU and the
    results are CPU tensors equal to the CPU index's (before: an error naming "gallery")."""
    emb, q = _rows(700, 32, seed), _rows(9, 32, seed + 1)
    index = GalleryIndex(32, "m")
    index.add(emb, labels=torch.arange(700) % 7)
    ref = index.search(q, 5)
    index.to("cuda")
    for queries in (q, q.numpy()):
        got = index.search(queries, 5)
        for name in ("scores", "indices", "ids", "labels"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.device.type == "cpu", name
            assert torch.allclose(a, b, atol=1e-6) if a.is_floating_point() else torch.equal(a, b), name
    got = index.search(q.cuda(), 5)
    assert got.scores.is_cuda and got.ids.is_cuda and torch.equal(got.ids.cpu(), ref.ids)


def test_flat_index_host_rows_stream_to_cuda_queries(seed):
    """numpy rows, CUDA queries: the rows are streamed chunk by chunk (never one whole copy on
    the GPU), the results are CUDA tensors equal to the CPU search's."""
    rows, q = _rows(40_000, 64, seed).numpy(), _rows(4, 64, seed + 1)
    index = FlatIndex(64)
    index.add(rows)
    D_ref, I_ref = index.search(q, 10)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    D, I = index.search(q.cuda(), 10)
    assert D.is_cuda and I.is_cuda
    assert torch.equal(I.cpu(), I_ref) and torch.allclose(D.cpu(), D_ref, atol=1e-5)
    # 40k x 64 fp32 rows = 10 MiB: a whole copy would show; two 8192-row chunks (4 MiB) do not
    assert torch.cuda.max_memory_allocated() - base < rows.nbytes


def test_flat_index_gpu_rows_take_host_queries(seed):
    """CUDA rows, numpy queries: searched on the GPU, numpy results (faiss's numpy in, numpy out)."""
    rows, q = _rows(3000, 16, seed), _rows(5, 16, seed + 1)
    cpu, gpu = FlatIndex(16), FlatIndex(16)
    cpu.add(rows)
    gpu.add(rows.cuda())
    D_ref, I_ref = cpu.search(q.numpy(), 7)
    D, I = gpu.search(q.numpy(), 7)
    assert isinstance(D, np.ndarray) and isinstance(I, np.ndarray)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_flat_index_rows_added_from_two_devices(seed):
    """numpy rows, then CUDA rows: both kept on the first rows' device (before: torch.cat of a
    CPU and a CUDA tensor raised)."""
    a, b, q = _rows(100, 8, seed), _rows(50, 8, seed + 1), _rows(3, 8, seed + 2)
    index, ref = FlatIndex(8), FlatIndex(8)
    index.add(a.numpy())
    index.add(b.cuda())
    ref.add(torch.cat([a, b]))
    np.testing.assert_array_equal(index.search(q.numpy(), 5)[1], ref.search(q.numpy(), 5)[1])


def test_host_gallery_with_a_chunk_size_beyond_its_rows(seed):
    """CUDA queries, a 1,000-row host gallery, chunk_size=2^22: the pinned staging buffers are
    sized to the gallery (before: two of 2^22 rows, 16 GiB of pinned memory at d = 512)."""
    g, q = _rows(1000, 512, seed), _rows(6, 512, seed + 1)
    s, i = cosine_topk(q.cuda(), g, 10, chunk_size=1 << 22)
    s_ref, i_ref = cosine_topk(q, g, 10)
    assert torch.equal(i.cpu(), i_ref) and torch.allclose(s.cpu(), s_ref, atol=1e-5)


def test_tar_at_far_with_flags_on_another_device(seed):
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    same = torch.rand(1000, generator=torch.Generator().manual_seed(seed + 1)) < 0.3
    ref = tar_at_far(scores, same)
    assert tar_at_far(scores, same.cuda()) == ref
    assert tar_at_far(scores.cuda(), same) == ref
