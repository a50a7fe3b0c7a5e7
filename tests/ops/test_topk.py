"""cosine_topk: exact against a float64 reference and faiss-cpu, ties, k = N, errors."""
import math
import sys

import numpy as np
import pytest
import torch

from bct_fast.ops import cosine_topk
from bct_fast.testing import available_devices
from topk_reference import assert_topk_matches_reference, reference_topk

# The kernel families this file's CUDA cases exercise (``auto`` picks the SIMT kernels when
# BCT_FAST_UNVERIFIED_KERNELS=1): a GPU run verifies a family only when every CUDA test that
# names it passed (benchmarks/verify_gpu_run.py).
KERNEL_FAMILIES = ("cosine_topk",)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("Q,N,d,k,chunk", [(1, 1, 3, 1, None), (7, 100, 33, 100, 13), (20, 257, 64, 5, 64),
                                           (3, 1000, 129, 17, 100), (50, 50, 8, 1, 7)])
def test_matches_float64_reference(seed, cpu_gemm, cpu_select, device, Q, N, d, k, chunk):
    q, g = torch.randn(Q, d), torch.randn(N, d)
    s, i = cosine_topk(q.to(device), g.to(device), k, chunk_size=chunk)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (Q, k)
    assert_topk_matches_reference(s, i, q, g, k)


@pytest.mark.parametrize("chunk", [None, 3, 4])
def test_ties_go_to_the_lower_index(cpu_gemm, cpu_select, chunk):
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    s, i = cosine_topk(q, g, 6, chunk_size=chunk)
    assert i[0].tolist() == [0, 2, 3, 4, 1, 5]
    assert s[0, :4].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_exclude_self_and_numpy_input(seed):
    x = torch.randn(40, 16)
    s, i = cosine_topk(x.numpy(), x.numpy(), 39, exclude_self=True, chunk_size=9)
    assert_topk_matches_reference(s, i, x, x, 39, exclude_self=True)
    assert not (i == torch.arange(40)[:, None]).any()


@pytest.mark.parametrize("device", available_devices())
def test_zero_rows_score_zero(seed, cpu_gemm, cpu_select, device):
    """An all-zero row has no direction: cosine 0 with everything (F.normalize's convention)."""
    g = torch.randn(50, 8)
    g[[3, 17]] = 0.0
    q = torch.randn(4, 8)
    q[2] = 0.0
    s, i = cosine_topk(q.to(device), g.to(device), 50, chunk_size=16)
    s, i = s.cpu(), i.cpu()
    assert torch.equal(s[2], torch.zeros(50)) and torch.equal(i[2], torch.arange(50))
    for r in (0, 1, 3):
        assert s[r, (i[r] == 3).nonzero()[0, 0]] == 0.0 and s[r, (i[r] == 17).nonzero()[0, 0]] == 0.0


def test_inner_product_mode(seed):
    q, g = torch.randn(5, 8), torch.randn(30, 8)
    s, i = cosine_topk(q, g, 30, normalize=False)
    full = q @ g.T
    assert torch.allclose(s, full.gather(1, i), atol=1e-6)
    assert (s[:, :-1] >= s[:, 1:]).all()


def test_matches_faiss_flat_ip(seed):
    faiss = pytest.importorskip("faiss")
    q = torch.nn.functional.normalize(torch.randn(25, 48), dim=1)
    g = torch.nn.functional.normalize(torch.randn(3000, 48), dim=1)
    index = faiss.IndexFlatIP(48)
    index.add(g.numpy())
    fs, fi = index.search(q.numpy(), 50)
    s, i = cosine_topk(q, g, 50, chunk_size=700)
    assert np.allclose(s.numpy(), fs, atol=1e-5)
    # identical neighbour lists unless two scores are within float noise of each other
    assert (i.numpy() == fi).mean() > 0.99


def test_bf16_gallery_scores_in_fp32(seed):
    q, g = torch.randn(4, 32), torch.randn(200, 32)
    s, i = cosine_topk(q, g.bfloat16(), 10)
    rs, _ = reference_topk(q, g.bfloat16().float(), 10)
    assert s.dtype == torch.float32 and torch.allclose(s.double(), rs, atol=1e-5)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_bf16_route_scores_in_fp32(seed, monkeypatch, device, normalize, exclude_self):
    """bf16 queries and gallery on CUDA: the torch path's GEMMs take the bf16 values as they are
    (bf16 x bf16 -> fp32) and apply the norms to the fp32 scores. On CPU tensors the route is
    forced (its product upcasts there: the same arithmetic); on CUDA it is the default. The lists
    are the float64 top-k of the same bf16 values, within fp32 noise, odd chunk and tail sizes."""
    import bct_fast.ops.topk as topk_mod

    taken = []
    if device == "cpu":
        monkeypatch.setattr(topk_mod, "tensor_core_scores", lambda q, g_dtype: q.dtype == g_dtype == torch.bfloat16)
    real = topk_mod.topk_epilogue.default_product
    monkeypatch.setattr(topk_mod.topk_epilogue, "default_product", lambda a, b: taken.append(1) or real(a, b))
    g = torch.randn(1000, 40).bfloat16()
    g[7] = 0  # a zero row scores 0
    q = g[:37].clone() if exclude_self else torch.randn(37, 40).bfloat16()
    s, i = cosine_topk(q.to(device), g.to(device), 9, normalize=normalize, exclude_self=exclude_self,
                       chunk_size=300, backend="torch")
    assert taken and s.dtype == torch.float32
    assert_topk_matches_reference(s.cpu(), i.cpu(), q.float(), g.float(), 9, atol=1e-5 if normalize else 1e-4,
                                  exclude_self=exclude_self, normalize=normalize)


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(k=0), ValueError, "k"),
    (dict(k=11), ValueError, "k"),
    (dict(k=10, exclude_self=True), ValueError, "exclude_self|k"),
    (dict(k=2.0), ValueError, "k"),
    (dict(k=2, chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_arguments(kw, exc, needle):
    with pytest.raises(exc, match=needle):
        cosine_topk(torch.randn(3, 4), torch.randn(10, 4), **kw)


def test_bad_tensors():
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(3, 4), torch.randn(0, 4), 1)
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(3, 4), torch.randn(10, 5), 1)
    g = torch.randn(10, 4)
    g[3, 1] = float("nan")
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(3, 4), g, 2)
    q = torch.randn(3, 4)
    q[0, 0] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        cosine_topk(q, torch.randn(10, 4), 2)


def test_boundary_and_inner_ties_with_random_data(seed, cpu_gemm, cpu_select):
    """Small-integer vectors (inner product: exact in fp32) make many ties, across and inside
    the k-th place."""
    g = torch.randint(-2, 3, (500, 3)).float()
    q = torch.randint(-2, 3, (30, 3)).float()
    full = (q @ g.T).numpy()
    for k in (1, 7, 64, 499, 500):
        s, i = cosine_topk(q, g, k, normalize=False, chunk_size=37)
        ri = np.lexsort((np.broadcast_to(np.arange(500), full.shape), -full), axis=1)[:, :k]
        assert torch.equal(i, torch.from_numpy(ri)), k


def test_exclude_self_with_a_larger_gallery(seed, cpu_gemm, cpu_select):
    """Queries are the first Q gallery rows (PML's ref_includes_query layout)."""
    g = torch.randn(90, 12)
    s, i = cosine_topk(g[:25], g, 30, exclude_self=True, chunk_size=16)
    assert_topk_matches_reference(s, i, g[:25], g, 30, exclude_self=True)


def test_memmap_gallery_is_streamed_by_chunks(seed, tmp_path):
    g = torch.randn(1000, 24)
    path = tmp_path / "g.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(1000, 24))
    mm[:] = g.numpy()
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=(1000, 24))
    q = torch.randn(9, 24)
    s, i = cosine_topk(q, ro, 40, chunk_size=128, progress=True)
    assert_topk_matches_reference(s, i, q, g, 40)


def test_mixed_devices_are_an_error():
    with pytest.raises(ValueError, match="gallery: on meta"):
        cosine_topk(torch.randn(3, 4), torch.randn(10, 4, device="meta"), 2)


def test_native_selector_contract():
    """The C++ running top-k refuses blocks out of gallery order and a flush before k candidates."""
    from bct_fast.ops import topk_select

    if not topk_select.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing")
    sel = topk_select.CpuRunningTopk(2, 3)
    sel.add(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), 10)
    with pytest.raises(ValueError, match="fewer than k"):
        sel.flush()
    with pytest.raises(ValueError, match="gallery order"):
        sel.add(torch.zeros(2, 2), 0)
    sel.add(torch.tensor([[2.0, 3.0], [2.0, 5.0]]).T.contiguous().T, 12)  # transposed storage
    s, i = sel.flush()
    assert s.tolist() == [[3.0, 3.0, 2.0], [5.0, 2.0, 2.0]]
    assert i.tolist() == [[10, 13, 12], [13, 11, 12]]


def test_dlpack_producers_are_viewed_without_a_copy(seed):
    """Any __dlpack__ producer (here a minimal wrapper around a CPU tensor; cupy on a GPU) is
    searched in place: the result equals the tensor's, and torch sees the same memory."""
    class Producer:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, *args, **kwargs):
            return self.t.__dlpack__(*args, **kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    q, g = torch.randn(5, 16), torch.randn(300, 16)
    s, i = cosine_topk(Producer(q), Producer(g), 7)
    s2, i2 = cosine_topk(q, g, 7)
    assert torch.equal(i, i2) and torch.equal(s, s2)
    assert torch.from_dlpack(Producer(g)).data_ptr() == g.data_ptr()
    with pytest.raises(TypeError, match="gallery: a DLPack object"):
        cosine_topk(q, Producer(torch.randn(3, 16).to_sparse()), 1)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def _small_memmap(tmp_path):
    g = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=(200_000, 64))
    g[:] = np.random.default_rng(0).standard_normal(g.shape, dtype=np.float32)
    g.flush()
    del g
    return np.load(tmp_path / "g.npy", mmap_mode="r")  # 51 MB on disk


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc needed")
@pytest.mark.parametrize("large", [True, False], ids=["larger_than_limit", "within_limit"])
def test_memmap_gallery_pages_are_released_when_large(tmp_path, seed, monkeypatch, large):
    """A read-only memmapped gallery above the keep-mapped limit (1/8 of RAM; lowered here) keeps
    resident memory bounded: pages read for a chunk are dropped after it (without it one pass kept
    the whole file resident). One within the limit stays mapped, so the next search does not fault
    every page back. Both give the same answer."""
    from bct_fast.ops import topk as topk_mod

    monkeypatch.setattr(topk_mod, "_keep_mapped_limit", lambda: 1 << 20 if large else 1 << 40)
    mm = _small_memmap(tmp_path)
    q = torch.randn(3, 64)
    before = _rss_file_kib()
    got = cosine_topk(q, mm, 5, chunk_size=8192)
    grown_mib = (_rss_file_kib() - before) / 1024
    if large:
        assert grown_mib < 20, f"file-backed resident memory grew by {grown_mib:.0f} MiB"
    else:
        assert grown_mib > 40, f"only {grown_mib:.0f} MiB of the 51 MB gallery stayed mapped"
    want = cosine_topk(q, torch.from_numpy(np.array(mm)), 5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("layout", ["row_major", "transposed", "strided"])
def test_native_selector_tie_heavy_blocks(seed, layout):
    """The C++ selector's compactions (radix select of the k-th key, stable tie filter) and its
    vector scans against a stable sort: few distinct values (ties across the k-th place and
    between blocks), +0.0 / -0.0 (equal scores), k = 1, k = N, one query, row tails."""
    from bct_fast.ops import topk_select

    if not topk_select.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing")
    for Q, N, k, chunk in [(1, 700, 1, 97), (3, 500, 500, 70), (70, 1000, 64, 129), (130, 333, 7, 333),
                           (5, 2000, 300, 1000), (66, 64, 64, 16)]:
        full = torch.randint(-3, 4, (Q, N)).float() / 4
        full[:, ::5] = 0.0
        full[:, 2::5] = -0.0
        sel = topk_select.CpuRunningTopk(Q, k)
        for n0 in range(0, N, chunk):
            b = full[:, n0:n0 + chunk]
            sel.add({"row_major": b.contiguous(), "transposed": b.T.contiguous().T, "strided": b}[layout], n0)
        s, i = sel.flush()
        ri = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(i, ri), (Q, N, k, chunk)
        assert torch.equal(s, full.gather(1, ri)), (Q, N, k, chunk)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_native_selector_first_block_sample_threshold(seed, k):
    """A query's first wide block (n >= 2 (2k + 64)) starts from the k-th best of a strided sample:
    ties at that value sitting between the sampled columns (lower indices than sampled ones) must
    still win, -inf (exclude_self) must stay out, and the result must equal a stable sort."""
    from bct_fast.ops import topk_select

    g = torch.Generator().manual_seed(seed)
    Q, n = 6, 8 * (2 * k + 64) + 5
    full = torch.randint(-2, 3, (Q, n), generator=g).float() / 2  # 5 values: ties everywhere
    full[1] = 0.5                      # one value in the whole row
    full[2, ::7] = -math.inf           # own rows, as exclude_self writes them
    full[3] = torch.randn(n, generator=g)
    full[4, : n // 2] = 1.0            # the best values only before the sample's later columns
    full[5, 1::2] = 1.0                # the best values only between even (sampled) columns
    for chunks in ([n], [n - 300, 300]):  # the sample comes from the first block only
        sel = topk_select.CpuRunningTopk(Q, k)
        n0 = 0
        for c in chunks:
            sel.add(full[:, n0:n0 + c].contiguous(), n0)
            n0 += c
        s, i = sel.flush()
        ri = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(i, ri), (k, chunks)
        assert torch.equal(s, full.gather(1, ri)), (k, chunks)


_SCAN_CHECK = """
import torch
from bct_fast._core.extension import native
from bct_fast.ops import topk_select
assert native() is not None, "the compiled extension did not load"
print(native().cpu_scan_kernel())
g = torch.Generator().manual_seed(0)
for Q, N, k, chunk in [(1, 700, 1, 97), (70, 1000, 64, 129), (5, 2000, 300, 1000), (66, 64, 64, 16),
                       (3, 1048, 10, 1048), (9, 4099, 33, 4099)]:
    for ties in (True, False):
        full = torch.randint(-3, 4, (Q, N), generator=g).float() / 4 if ties else torch.randn(Q, N, generator=g)
        full[:, ::5] = 0.0
        full[:, 2::5] = -0.0
        sel = topk_select.CpuRunningTopk(Q, k)
        for n0 in range(0, N, chunk):
            sel.add(full[:, n0:n0 + chunk].contiguous(), n0)
        s, i = sel.flush()
        ri = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(i, ri), (Q, N, k, chunk, ties)
        assert torch.equal(s, full.gather(1, ri)), (Q, N, k, chunk, ties)
print("ok")
"""


@pytest.mark.parametrize("scan", ["avx512", "avx2", "portable"])
def test_every_cpu_row_scan_is_exact(scan, tmp_path):
    """The selector's row scan exists in AVX-512, AVX2 and portable versions, picked at load time;
    BCT_FAST_CPU_SCAN narrows the pick so that each version runs here, in a fresh process, against
    a stable sort (ties, +-0.0, row tails of 1..63 scores)."""
    import os
    import subprocess
    import sys

    from bct_fast.ops import topk_select

    if not topk_select.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing")
    cap = torch.backends.cpu.get_cpu_capability()
    supported = {"portable"} | ({"avx2"} if cap in ("AVX2", "AVX512") else set()) | ({"avx512"} if cap == "AVX512" else set())
    expected = scan if scan in supported else ("avx2" if "avx2" in supported and scan == "avx512" else "portable")
    # PYTHONSAFEPATH and a neutral cwd: the child imports the installed package, never a source tree
    env = {**os.environ, "BCT_FAST_CPU_SCAN": "" if scan == "avx512" else scan, "PYTHONSAFEPATH": "1"}
    r = subprocess.run([sys.executable, "-c", _SCAN_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    picked, verdict = r.stdout.split()[:2]
    assert picked == expected and verdict == "ok"


_POOL_CHECK = """
import re
import torch
from bct_fast._core.extension import native
from bct_fast.ops import topk_select
assert native() is not None, "the compiled extension did not load"
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
full = torch.randn(1000, 3000, generator=g)
sel = topk_select.CpuRunningTopk(1000, 50)  # 1000 queries: the selector splits them over threads
for n0 in range(0, 3000, 700):
    sel.add(full[:, n0:n0 + 700].contiguous(), n0)
s, i = sel.flush()
ri = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :50]
assert torch.equal(i, ri) and torch.equal(s, full.gather(1, ri))
runtimes = set()
for line in open("/proc/self/maps"):
    m = re.search(r"/(lib(?:gomp|iomp5|omp)[^/]*\\.so[^/\\s]*)$", line.strip())
    if m:
        runtimes.add(line.split()[-1])
print(native().cpu_thread_pool(), len(runtimes))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_selector_threads_come_from_torchs_openmp_pool(tmp_path):
    """With OpenMP the selector's threads are torch's own pool: one OpenMP runtime in the process
    (a second pool would spin beside torch's and take the cores from it), and a search split
    over 2 threads still equals a stable sort. Runs in a fresh process so the maps are clean."""
    import os
    import subprocess

    from bct_fast.ops import topk_select

    if not topk_select.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    r = subprocess.run([sys.executable, "-c", _POOL_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    pool, runtimes = r.stdout.split()[-2:]
    assert pool in ("openmp", "std::thread")
    if pool == "openmp":
        assert runtimes == "1", f"{runtimes} OpenMP runtimes loaded: the selector does not share torch's pool"


# ---- the fixed-shape running top-k of GPUs (forced on CPU tensors here) -------------------------

@pytest.fixture
def device_select(monkeypatch):
    from bct_fast.ops import topk as topk_mod, topk_select

    monkeypatch.setattr(topk_select, "USE_CPU_SELECT", False)
    monkeypatch.setattr(topk_mod, "_sync_free", lambda q, acc, N: acc == torch.float32)
    calls = []
    real = topk_mod._exact_rows
    monkeypatch.setattr(topk_mod, "_exact_rows", lambda ids, *a: calls.append(ids.tolist()) or real(ids, *a))
    return calls


def _rows_needing_the_exact_pass(full: np.ndarray, k: int, chunk: int) -> list[int]:
    """Rows where some block of ``chunk`` columns has more scores equal to its k-th best ``v``
    than places (count(>= v) > k) and ``v`` is the row's final k-th best."""
    rows = []
    for r, row in enumerate(full):
        final_kth = np.sort(row)[::-1][k - 1]
        for c0 in range(0, row.size, chunk):
            block = row[c0:c0 + chunk]
            if block.size <= k:
                continue
            v = np.sort(block)[::-1][k - 1]
            if (block >= v).sum() > k and v == final_kth:
                rows.append(r)
                break
    return rows


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("exclude_self", [False, True])
def test_device_selection_redoes_only_rows_tied_at_a_blocks_kth_place(seed, device_select, device, exclude_self):
    """Ties at a block's k-th place (torch.topk picks among them arbitrarily) are recomputed
    exactly where they can change the result (the tied score is the row's final k-th best), and
    only those rows: the result is the lexicographic (score desc, index asc) top-k. On CUDA
    tensors this selection is the default of the chunked path."""
    g = torch.randint(-2, 3, (500, 3)).float()
    q = g[:30].clone() if exclude_self else torch.randint(-2, 3, (30, 3)).float()
    full = (q @ g.T).numpy().astype(np.float64)
    if exclude_self:
        full[np.arange(30), np.arange(30)] = -np.inf
    redone = 0
    for k in (1, 7, 64):
        device_select.clear()
        s, i = cosine_topk(q.to(device), g.to(device), k, normalize=False, exclude_self=exclude_self,
                           chunk_size=37, backend="torch")
        ri = np.lexsort((np.broadcast_to(np.arange(500), full.shape), -full), axis=1)[:, :k]
        assert torch.equal(i.cpu(), torch.from_numpy(ri)), k
        expected = _rows_needing_the_exact_pass(full, k, 37)
        assert device_select == ([expected] if expected else []), k  # once, those rows
        redone += len(expected)
        if k >= 37:  # a block's every column is kept: the keys alone decide
            assert expected == []
    assert redone > 0  # these integer scores tie everywhere: the exact pass did run
    device_select.clear()
    q, g = torch.randn(30, 16), torch.randn(500, 16)  # continuous values: no tie, no second pass
    s, i = cosine_topk(q.to(device), g.to(device), 10, chunk_size=37, backend="torch")
    assert device_select == []
    assert_topk_matches_reference(s.cpu(), i.cpu(), q, g, 10)


def test_device_selection_skips_ties_below_the_final_kth(device_select):
    """Ties at a block's k-th place below the row's final k-th best cannot change the result:
    no second pass over the gallery (random bf16 rows used to trigger one on most searches)."""
    q = torch.tensor([[1.0, 0.0]])
    g = torch.zeros(200, 2)
    g[:, 1] = 1.0            # 200 rows scoring 0: every block ties at its k-th place
    g[150:152, 0] = 1.0      # two rows scoring 1 / sqrt(2) ... in the fourth block
    g[5] = torch.tensor([1.0, 0.0])  # ... and one scoring 1 in the first
    s, i = cosine_topk(q, g, 3, chunk_size=40, backend="torch")
    assert device_select == []
    assert i.tolist() == [[5, 150, 151]]
    s, i = cosine_topk(q, g, 10, chunk_size=40, backend="torch")  # the k-th best is a tied 0
    assert device_select == [[0]]
    assert i.tolist() == [[5, 150, 151, 0, 1, 2, 3, 4, 6, 7]]


def test_device_selection_names_non_finite_input_after_the_loop(seed, device_select):
    g = torch.randn(1000, 8)
    g[777, 3] = float("inf")
    with pytest.raises(ValueError, match="gallery"):
        cosine_topk(torch.randn(5, 8), g, 3, chunk_size=100)


def test_composite_keys_order_and_round_trip(seed):
    """Key order = (score descending, index ascending) over random and special fp32 values (-0
    counts as +0); decoding returns the scores and indices."""
    from bct_fast.ops.topk_select import MAX_COMPOSITE_INDEX, composite_keys, decode_keys

    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, 1.0])
    s = torch.cat([special, torch.randn(500), torch.randint(-3, 4, (300,)).float()])
    idx = torch.randint(0, MAX_COMPOSITE_INDEX + 1, (s.numel(),))
    idx[:3] = torch.tensor([0, MAX_COMPOSITE_INDEX, 5])
    keys = composite_keys(s, idx)
    order = torch.argsort(keys, descending=True).numpy()
    expect = np.lexsort((idx.numpy(), -(s + 0.0).double().numpy()))
    assert np.array_equal(order, expect)
    v, j = decode_keys(keys)
    assert torch.equal(v, s + 0.0) and torch.equal(j, idx)


def test_a_chunk_size_beyond_the_gallery_is_cut_to_it():
    """chunk_size=2^22 on a 1,000-row gallery: chunks of 1,000 rows, so the query blocks are as
    large as for any other 1,000-row chunk (and a host gallery headed for a GPU pins 1,000-row
    staging buffers, not 2^22-row ones: 16 GiB at d = 512). The rule only, for both device types."""
    from bct_fast.ops import topk as topk_mod

    for device_type in ("cpu", "cuda"):
        chunk, q_block = topk_mod.block_shape(300, 1000, 512, 10, device_type, 1 << 22)
        assert chunk == 1000 and q_block == min(300, topk_mod._BLOCK_ELEMS // 1000)
        assert topk_mod.block_shape(300, 1000, 512, 10, device_type, 256) == (256, 300)
