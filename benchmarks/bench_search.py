"""Exact top-k search vs its peers: faiss-cpu IndexFlatIP and torch mm + topk.

Axes: provider x (Q, N, k) at d = 512, fp32 on CPU. Every provider gets the same L2-normalized
vectors (IndexFlatIP's contract); ``bct_fast`` is ``cosine_topk(normalize=False)`` (what
``GalleryIndex`` runs: rows are normalized once when added), ``bct_fast_cosine`` also
normalizes on the fly. ``torch`` is the plain q @ g.T + topk (a Q x N matrix) where it fits in
memory. On CUDA (``test_cuda_search_fp32``, the issue's shapes): ``bct_fast_auto`` (the default:
``backend="auto"`` with this checkout's gpu_verified.json), ``bct_fast_cuda`` (the SIMT
fused kernel, ``backend="cuda"``), ``bct_fast_epilogue`` (cuBLAS fp32 blocks + the selection
kernel, its fp32 exact mode), ``bct_fast_epilogue_screen`` (its screened mode: bf16 tensor-core
screen, float64 rescoring), ``torch`` (mm + topk in gallery chunks) and ``faiss`` (GpuIndexFlatIP,
where faiss with GPU support imports), time and peak memory (torch.cuda.max_memory_allocated;
faiss's own allocations are not counted). bf16 galleries on CUDA: bench_search_cuda_bf16.py.
Cases: ``CPU_QUICK`` by default, ``CPU_FULL`` with ``--full`` (benchmarks/conftest.py, ``grid``).
Run: pytest benchmarks/bench_search.py --benchmark-only [--full]
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bct_fast.search import cosine_topk

D = 512
# (Q, N, k). --full: the whole grid; by default one query and a small batch on a 1M gallery, and
# a 1000-query batch at small and large k (the large-k row is our closest to faiss).
CPU_FULL = [(1, 1_000_000, 100), (16, 1_000_000, 100), (100, 1_000_000, 100),
            (1000, 100_000, 10), (1000, 100_000, 1000), (1000, 200_000, 100)]
CPU_QUICK = [(1, 1_000_000, 100), (16, 1_000_000, 100), (1000, 100_000, 10), (1000, 100_000, 1000)]
# The grid, fp32, d = 512 (Q 1 / 1k / 10k, N 1M / 10M, k 10 / 100 / 1000 / 4096), trimmed to
# ~2-3 minutes on an H100 (estimates per call: fp32 GEMM ~50 TFLOP/s, bf16 ~600; each case runs
# rounds + 2 calls, five providers): 10k x 10M only at k = 100 (~40 s: torch / SIMT / epilogue fp32
# ~2-3 s a call, the screen ~0.3 s), 10k x 1M at every k (~16 s), 1k x 10M at k = 10 and 1000
# (~15 s), 1k x 1M at every k (~4 s), Q = 1 x 10M at every k (~10 s, latency-bound), 1 x 1M (~1 s).
CUDA_FP32_CASES = ([(10_000, 10_000_000, 100)] + [(10_000, 1_000_000, k) for k in (10, 100, 1000, 4096)]
                   + [(1000, 10_000_000, 10), (1000, 10_000_000, 1000)]
                   + [(1000, 1_000_000, k) for k in (10, 100, 1000, 4096)]
                   + [(1, 10_000_000, k) for k in (10, 100, 1000, 4096)] + [(1, 1_000_000, 100)])
CUDA_PROVIDERS = ["bct_fast_auto", "bct_fast_cuda", "bct_fast_epilogue", "bct_fast_epilogue_screen", "torch", "faiss"]

_data: dict = {}


def unit_rows(n, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g, device=device), dim=1)
    return x.to(dtype=dtype)


def cpu_data(Q, N):
    key = (Q, N)
    if key not in _data:
        _data.clear()
        _data[key] = (unit_rows(Q, 1), unit_rows(N, 2))
    return _data[key]


def faiss_index(g):
    faiss = pytest.importorskip("faiss")
    key = ("faiss", g.shape[0], g.data_ptr())
    if key not in _data:
        index = faiss.IndexFlatIP(D)
        index.add(g.numpy())
        _data[key] = index
    return _data[key]


@pytest.mark.parametrize("provider", ["bct_fast", "bct_fast_cosine", "faiss", "torch"])
@pytest.mark.grid("Q,N,k", CPU_QUICK, CPU_FULL)
def test_cpu_search(measure, provider, Q, N, k):
    torch.set_num_threads(torch.get_num_threads())
    q, g = cpu_data(Q, N)
    if provider == "bct_fast":
        fn = lambda: cosine_topk(q, g, k, normalize=False)  # noqa: E731
    elif provider == "bct_fast_cosine":
        fn = lambda: cosine_topk(q, g, k)  # noqa: E731
    elif provider == "faiss":
        index, qn = faiss_index(g), q.numpy()
        fn = lambda: index.search(qn, k)  # noqa: E731
    else:
        if Q * N > 200_000_000:
            pytest.skip("the Q x N score matrix would need more than 800 MB")
        fn = lambda: torch.topk(q @ g.T, k, dim=1)  # noqa: E731
    measure(fn, "cpu", rounds=3, Q=Q, N=N, d=D, k=k, provider=provider, dtype="float32")


# (Q, N, d, k, gallery storage): a covering design over the shapes users run, every value of
# every axis at least twice (issue 16): d 64..1024, Q 1..10000, N 10k..1M (5M once, memory-
# mapped), k 1..4096; fp16 / bf16 galleries once each (faiss searches the same rounded rows in
# fp32). The quick subset keeps one row per regime.
SHAPES_FULL = [
    (1, 1_000_000, 64, 10, "float32"), (1, 200_000, 1024, 4096, "float32"), (16, 1_000_000, 128, 100, "float32"),
    (16, 10_000, 768, 1, "float32"), (256, 200_000, 256, 1000, "float32"), (256, 1_000_000, 384, 10, "float32"),
    (2000, 200_000, 128, 10, "float32"), (2000, 10_000, 512, 4096, "float32"), (10_000, 10_000, 64, 100, "float32"),
    (10_000, 200_000, 256, 1, "float32"), (2000, 1_000_000, 64, 1000, "float32"), (1, 10_000, 384, 1, "float32"),
    (256, 10_000, 1024, 100, "float32"), (16, 200_000, 512, 1000, "float32"), (1, 1_000_000, 768, 100, "float32"),
    (1, 5_000_000, 64, 10, "memmap"), (256, 200_000, 256, 10, "bfloat16"), (16, 1_000_000, 128, 100, "float16"),
]
SHAPES_QUICK = [(1, 1_000_000, 64, 10, "float32"), (16, 10_000, 768, 1, "float32"),
                (2000, 200_000, 128, 10, "float32"), (256, 200_000, 256, 10, "bfloat16")]
_shape_data: dict = {}


def shape_data(Q, N, d, storage, tmp_dir):
    """Queries [Q, d] fp32, the gallery as stored (tensor or memmap) and its fp32 values for faiss."""
    key = (Q, N, d, storage)
    if key not in _shape_data:
        _shape_data.clear()
        gen = torch.Generator().manual_seed(d)
        q = torch.nn.functional.normalize(torch.randn(Q, d, generator=gen), dim=1)
        g = torch.nn.functional.normalize(torch.randn(N, d, generator=gen), dim=1)
        if storage in ("bfloat16", "float16"):
            g = g.to(getattr(torch, storage))
            g32 = g.float()
        elif storage == "memmap":
            path = tmp_dir / f"gallery_{N}x{d}.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, d))
            mm[:] = g.numpy()
            mm.flush()
            del mm
            g32, g = g, np.load(path, mmap_mode="r")
        else:
            g32 = g
        _shape_data[key] = (q, g, g32)
    return _shape_data[key]


def faiss_flat_ip_search(q: torch.Tensor, g32: torch.Tensor, k: int):
    """faiss-cpu's exact inner-product search of ``q`` over the fp32 gallery ``g32``, built once:
    the timed call is the search alone."""
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(g32.shape[1])
    index.add(g32.numpy())
    qn = q.numpy()
    return lambda: index.search(qn, k)


@pytest.mark.parametrize("provider", ["bct_fast", "faiss", "torch"])
@pytest.mark.grid("Q,N,d,k,storage", SHAPES_QUICK, SHAPES_FULL)
def test_cpu_search_shapes(measure, tmp_path_factory, provider, Q, N, d, k, storage):
    _search_shape(measure, tmp_path_factory, provider, Q, N, d, k, storage)


# Shapes the tuning never saw: drawn once, after the grid above was tuned, by
# random.Random(20261125) from Q {1, 3, 8, 40, 100, 500, 1000, 3000, 5000}, N {30k, 75k, 300k,
# 600k, 2M}, d {32, 48, 96, 200, 300, 640, 1536}, k {1, 5, 20, 50, 200, 500, 2000} and the three
# storages (one draw, N = 2M at d = 1536 in bf16, cut to 600k: faiss's fp32 copy would not fit).
SHAPES_HOLDOUT = [
    (1, 300_000, 200, 200, "float32"), (1, 2_000_000, 200, 5, "float16"), (3000, 30_000, 96, 200, "float32"),
    (1, 600_000, 1536, 500, "bfloat16"), (100, 30_000, 32, 200, "float32"), (8, 2_000_000, 32, 5, "float32"),
    (1000, 300_000, 1536, 5, "float32"), (500, 300_000, 1536, 200, "bfloat16"),
    (500, 30_000, 1536, 2000, "bfloat16"), (1000, 600_000, 32, 500, "float32"), (8, 75_000, 200, 50, "float32"),
    (3000, 30_000, 300, 500, "float16"),
]


@pytest.mark.parametrize("provider", ["bct_fast", "faiss", "torch"])
@pytest.mark.grid("Q,N,d,k,storage", SHAPES_HOLDOUT[:2], SHAPES_HOLDOUT)
def test_cpu_search_holdout(measure, tmp_path_factory, provider, Q, N, d, k, storage):
    _search_shape(measure, tmp_path_factory, provider, Q, N, d, k, storage)


# Not timed: the answer of every grid and holdout row against float64 (run with --full and
# without --benchmark-only: pytest benchmarks/bench_search.py -k rows_are_exact --full).
@pytest.mark.grid("Q,N,d,k,storage", SHAPES_QUICK, SHAPES_FULL + SHAPES_HOLDOUT)
def test_cpu_search_rows_are_exact(tmp_path_factory, Q, N, d, k, storage):
    """The first 16 queries' top-k from the benchmarked call (normalize=False, as timed) against
    float64 scores of the stored gallery values: every returned score within 1e-5 of the float64
    score of its rank, its index holding that score, no index twice, and the index itself equal
    wherever the float64 order is decided by more than 1e-5 (fp32 accumulation may swap closer
    neighbours; the exact tests check the tie rule on constructed data)."""
    q, g, g32 = shape_data(Q, N, d, storage, tmp_path_factory.getbasetemp())
    s, i = cosine_topk(q, g, k, normalize=False)
    m = min(Q, 16)
    qs = q[:m].double()
    top_s, top_i = [], []
    for n0 in range(0, N, 262_144):  # running float64 top-(k+1) over gallery chunks
        sc = qs @ g32[n0:n0 + 262_144].double().T  # g32: the stored values (fp16 / bf16 upcast)
        v, j = sc.topk(min(k + 1, sc.shape[1]), dim=1)
        top_s.append(v)
        top_i.append(j + n0)
    v, j = torch.cat(top_s, 1), torch.cat(top_i, 1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k + 1]
    ref_s, ref_i = v.gather(1, order), j.gather(1, order)
    got_s, got_i = s[:m].double(), i[:m]
    atol = 1e-5
    assert torch.allclose(got_s, ref_s[:, :k], atol=atol), "scores differ from the float64 top-k"
    held = torch.stack([g32[r].double() @ qs[a] for a, r in enumerate(got_i)])
    assert torch.allclose(held, ref_s[:, :k], atol=atol), "a returned index does not hold its rank's score"
    assert all(len(set(row)) == k for row in got_i.tolist()), "an index is returned twice"
    gap = ref_s[:, :-1] - ref_s[:, 1:]
    decided = torch.ones(m, k, dtype=torch.bool)
    decided[:, 1:] &= gap[:, :k - 1] > atol  # apart from the rank above
    nxt = min(k, gap.shape[1])               # ranks that have a rank below (k + 1 listed unless N = k)
    decided[:, :nxt] &= gap[:, :nxt] > atol
    assert torch.equal(got_i[decided], ref_i[:, :k][decided]), "a clearly ordered neighbour is misplaced"


def _search_shape(measure, tmp_path_factory, provider, Q, N, d, k, storage):
    q, g, g32 = shape_data(Q, N, d, storage, tmp_path_factory.getbasetemp())
    if provider == "bct_fast":
        fn = lambda: cosine_topk(q, g, k, normalize=False)  # noqa: E731
    elif provider == "faiss":
        fn = faiss_flat_ip_search(q, g32, k)
    else:
        if Q * N > 200_000_000 or storage == "memmap":
            pytest.skip("the Q x N score matrix would need more than 800 MB (or the gallery is on disk)")
        fn = lambda: torch.topk(q @ g32.T, k, dim=1)  # noqa: E731
    measure(fn, "cpu", rounds=3, Q=Q, N=N, d=d, k=k, provider=provider, dtype=storage)


# bf16 screening (issue 16, bct_fast/ops/topk_screen.py): the exact fp32 path and the screened
# one forced on, side by side with faiss. GEMM-bound rows (many queries, d >= 256) where it should
# win, and rows where it may lose (small d, large k, few queries). Same data as the shapes grid.
SCREEN_FULL = [
    (2000, 200_000, 128, 10), (2000, 200_000, 256, 10), (2000, 200_000, 512, 10), (2000, 200_000, 1024, 10),
    (2000, 200_000, 512, 100), (10_000, 200_000, 256, 10), (256, 1_000_000, 384, 10), (2000, 1_000_000, 256, 10),
    (2000, 200_000, 64, 10), (256, 200_000, 256, 1000), (16, 1_000_000, 128, 100), (1, 1_000_000, 768, 100),
    (10_000, 10_000, 64, 100),
]
SCREEN_QUICK = [(2000, 200_000, 512, 10), (2000, 200_000, 128, 10), (256, 200_000, 256, 1000)]


@pytest.mark.parametrize("provider", ["bct_fast_exact", "bct_fast_screen", "faiss"])
@pytest.mark.grid("Q,N,d,k", SCREEN_QUICK, SCREEN_FULL)
def test_cpu_search_screen(measure, monkeypatch, tmp_path_factory, provider, Q, N, d, k):
    from bct_fast.ops import topk

    q, g, _ = shape_data(Q, N, d, "float32", tmp_path_factory.getbasetemp())
    if provider == "faiss":
        fn = faiss_flat_ip_search(q, g, k)
    else:
        monkeypatch.setattr(topk, "_SCREEN", provider == "bct_fast_screen")
        fn = lambda: cosine_topk(q, g, k, normalize=False)  # noqa: E731
    measure(fn, "cpu", rounds=3, Q=Q, N=N, d=d, k=k, provider=provider, dtype="float32")


def torch_chunked_topk(q, g, k, chunk=262_144):
    """The strongest simple GPU peer: mm per gallery chunk + topk, then merge."""
    best_s = best_i = None
    for n0 in range(0, g.shape[0], chunk):
        s, i = torch.topk(q @ g[n0:n0 + chunk].T, min(k, g.shape[0] - n0), dim=1)
        i += n0
        if best_s is not None:
            s, j = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = s, i
    return best_s, best_i


def cuda_rows(n, seed, dtype, d=D):
    """Unit rows on the GPU, one gallery and one query set cached (a 10M gallery is 20 GB: the
    previous one is freed first; normalized in place, so the peak is the gallery itself)."""
    key = (n, seed, dtype, d)
    if key not in _data:
        for old in [k for k in _data if isinstance(k, tuple) and len(k) == 4 and k[1] == seed]:
            del _data[old]
        torch.cuda.empty_cache()
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(n, d, generator=gen, device="cuda")
        x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        _data[key] = x.to(dtype)
    return _data[key]


def faiss_gpu_search(g, k):
    """faiss GpuIndexFlatIP over the same rows (skipped where faiss has no GPU support)."""
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support")
    if k > 2048:
        pytest.skip("faiss GPU search takes k <= 2048")
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, D)
    index.add(g.cpu().numpy())
    return lambda qn: index.search(qn, k)


def cuda_search_fn(provider, q, g, k):
    if provider == "bct_fast_epilogue_screen":
        from bct_fast.ops.topk_epilogue import cosine_topk_epilogue

        return lambda: cosine_topk_epilogue(q, g, k, normalize=False, screen=True)
    if provider == "faiss":
        search, qn = faiss_gpu_search(g, k), q.cpu().numpy()
        return lambda: search(qn)
    if provider.startswith("bct_fast"):
        backend = provider.rsplit("_", 1)[1]
        return lambda: cosine_topk(q, g, k, normalize=False, backend=backend)
    return lambda: torch_chunked_topk(q, g, k)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
@pytest.mark.parametrize("Q,N,k", CUDA_FP32_CASES, ids=[f"Q{q}-N{n}-k{k}" for q, n, k in CUDA_FP32_CASES])
def test_cuda_search_fp32(measure, provider, Q, N, k):
    q, g = cuda_rows(Q, 1, torch.float32), cuda_rows(N, 2, torch.float32)
    rounds = 3 if Q * N >= 10**10 else 5  # the 10k x 10M case: ~2-3 s a call for the fp32 GEMMs
    measure(cuda_search_fn(provider, q, g, k), "cuda", rounds=rounds, Q=Q, N=N, d=D, k=k, provider=provider,
            dtype="float32")
