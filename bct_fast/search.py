"""Exact top-k cosine search of queries against a gallery, in bounded memory.

``cosine_topk`` scores ``query_block x chunk_size`` similarity blocks, reduces each to its top-k
and merges, so the Q x N score matrix never exists. On CUDA (when the extension was built with
nvcc) each gallery chunk goes through the fused kernel, which keeps the per-query top-k on chip;
elsewhere a chunked PyTorch path computes the same function. On a CPU the score blocks come from
oneDNN (``_cpu_gemm``) and the running top-k is kept by the extension's C++ selector
(``_native.CpuRunningTopk``) when it is built, else by ``_RunningTopk`` in PyTorch. Results are
exact, sorted by score descending, ties to the lower gallery index.

Galleries larger than device memory: pass the gallery as a CPU tensor or a numpy array / memmap
with CUDA queries; chunks are copied through pinned memory and merged on the device.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from bct_fast import _native
from bct_fast._backend import warn_fallback
from bct_fast._checks import check_matrix, nonfinite_error
from bct_fast._chunked import inv_row_norms
from bct_fast._cpu_gemm import mm_nt

__all__ = ["cosine_topk", "KnnFunc", "GalleryIndex"]

_BLOCK_ELEMS = 1 << 24  # scores per block: 16M fp32 = 64 MiB
_DEFAULT_CHUNK = 8192   # gallery rows per chunk
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def __getattr__(name: str):  # GalleryIndex lives in its own module (it imports this one)
    if name == "GalleryIndex":
        from bct_fast.gallery import GalleryIndex
        return GalleryIndex
    raise AttributeError(f"module 'bct_fast.search' has no attribute {name!r}")


def _check_gallery(g, name: str):
    """A torch matrix, or a 2-D float numpy array / memmap (kept on the host, read by chunks)."""
    if isinstance(g, np.ndarray):
        if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
            raise ValueError(f"{name}: expected a non-empty 2-D array [rows, dim], got shape {g.shape}")
        if g.dtype.type not in _NUMPY_FLOATS:
            raise TypeError(f"{name}: numpy dtype {g.dtype} is not supported (float16/32/64)")
        return g
    return check_matrix(g, name)


def _host_tensor(a: np.ndarray) -> Tensor:
    """numpy -> CPU tensor; read-only arrays (memmaps opened "r") are copied, as torch needs."""
    return torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))


def _torch_dtype(g) -> torch.dtype:
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[g.dtype.type] \
        if isinstance(g, np.ndarray) else g.dtype


def _sort_rows_by_score_then_column(vals: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by score descending, equal scores by ascending column."""
    cols, perm = cols.sort(dim=1)
    vals = vals.gather(1, perm)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def _topk_lowest_index_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k per row, descending, equal scores ordered by ascending column (exact tie rule).

    torch.topk breaks ties arbitrarily; only rows with a tie across the k-th place need the
    slower exact selection, the rest are just reordered."""
    n = scores.shape[1]
    if k >= n:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    vals, cols = torch.topk(scores, k + 1, dim=1)
    tied = vals[:, k - 1] == vals[:, k]
    out_v, out_c = _sort_rows_by_score_then_column(vals[:, :k], cols[:, :k])
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        s = scores[rows]
        c = _first_k_columns(s, vals[rows, k - 1:k], k)
        out_v[rows], out_c[rows] = _sort_rows_by_score_then_column(s.gather(1, c), c)
    return out_v, out_c


def _first_k_columns(s: Tensor, kth: Tensor, k: int) -> Tensor:
    """Columns [rows, k], ascending, of every score above the row's k-th score ``kth`` [rows, 1]
    plus the leftmost scores equal to it: the exact tie rule when column order is index order."""
    above = s > kth
    need = k - above.sum(1, keepdim=True)
    equal = s == kth
    take = above | (equal & (torch.cumsum(equal, dim=1) <= need))
    return take.nonzero()[:, 1].view(s.shape[0], k)


def _gallery_chunks(g, chunk: int, device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(row0, chunk on device)``. Host galleries headed for CUDA go through two pinned
    staging buffers so the next copy overlaps the current chunk's search."""
    N = g.shape[0]
    host = isinstance(g, np.ndarray) or g.device.type == "cpu"
    if not (host and device.type == "cuda"):
        for n0 in range(0, N, chunk):
            part = g[n0:n0 + chunk]
            if isinstance(part, np.ndarray):
                part = _host_tensor(part)
            yield n0, part.to(device=device, dtype=dtype or part.dtype)
        return
    src_dtype = _torch_dtype(g)
    staging = [torch.empty(chunk, g.shape[1], dtype=src_dtype).pin_memory() for _ in range(2)]
    done = [None, None]
    for step, n0 in enumerate(range(0, N, chunk)):
        buf = staging[step % 2]
        if done[step % 2] is not None:
            done[step % 2].synchronize()  # the copy that last read this buffer has finished
        part = g[n0:n0 + chunk]
        rows = part.shape[0]
        buf[:rows].copy_(_host_tensor(part) if isinstance(part, np.ndarray) else part)
        on_dev = buf[:rows].to(device, non_blocking=True)
        done[step % 2] = torch.cuda.Event()
        done[step % 2].record(torch.cuda.current_stream(device))
        yield n0, on_dev.to(dtype or on_dev.dtype)


class _RunningTopk:
    """The running top-k of one query block over gallery chunks (rows ``n0 + j``).

    Once a query holds k candidates, only scores strictly above its k-th best can enter (a later
    row with an equal score has a higher index and loses the tie): a cheap mask replaces a full
    selection over each chunk, and survivors are merged in batches of about k columns. The
    running set is kept unordered (plus its k-th score); it is sorted once, at the end. That
    keeps this path GEMM-bound on a CPU."""

    def __init__(self, k: int):
        self.k = k
        self.best: tuple[Tensor, Tensor] | None = None  # (scores, gallery indices), any order
        self.kth: Tensor | None = None                   # [rows, 1] k-th best score, once full
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.pending_width = 0

    def add(self, s: Tensor, n0: int) -> None:
        if self.kth is None:
            cols = torch.arange(n0, n0 + s.shape[1], device=s.device).expand(s.shape[0], -1)
            self.merge((s, cols))
            return
        if s.stride(0) == 1 and s.shape[1] > 1:
            # A transposed view of a [chunk, Q] product: scan it in storage order (a strided
            # nonzero is ~2x slower), then group by query with a stable sort of the survivors.
            cols, rows = (s.T > self.kth.T).nonzero(as_tuple=True)
            rows, order = torch.sort(rows, stable=True)
            cols = cols[order]
        else:
            rows, cols = (s > self.kth).nonzero(as_tuple=True)  # ascending columns within a row
        if rows.numel() == 0:
            return
        counts = torch.bincount(rows, minlength=s.shape[0])
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows.shape[0], device=s.device) - starts[rows]
        cand_s = torch.full((s.shape[0], width), -math.inf, dtype=s.dtype, device=s.device)
        cand_i = torch.full((s.shape[0], width), -1, dtype=torch.int64, device=s.device)
        cand_s[rows, pos] = s[rows, cols]
        cand_i[rows, pos] = cols + n0
        self.pending.append((cand_s, cand_i))
        self.pending_width += width
        if self.pending_width >= max(self.k, 64):
            self._merge_pending()

    def merge(self, new: tuple[Tensor, Tensor]) -> None:
        """Fold in candidates (scores, gallery indices; padding columns carry -inf scores)."""
        if self.best is not None:
            new = (torch.cat([self.best[0], new[0].to(self.best[0].dtype)], 1), torch.cat([self.best[1], new[1]], 1))
        self.best = _select_unordered(new[0], new[1], self.k)
        if self.best[0].shape[1] == self.k:
            self.kth = self.best[0].amin(1, keepdim=True)

    def _merge_pending(self) -> None:
        if self.pending:
            self.merge((torch.cat([p[0] for p in self.pending], 1), torch.cat([p[1] for p in self.pending], 1)))
            self.pending, self.pending_width = [], 0

    def flush(self) -> tuple[Tensor, Tensor]:
        """The final top-k: sorted by score descending, ties by ascending gallery index."""
        self._merge_pending()
        return _sort_rows_by_score_then_column(*self.best)


def _select_unordered(s: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (score, index) pairs per row in any order; equal scores at the k-th place go
    to the lower index. ``idx`` need not be ordered."""
    if s.shape[1] <= k:
        return s, idx
    vals, cols = torch.topk(s, k, dim=1, sorted=False)
    kth = vals.amin(1, keepdim=True)
    tied = (s >= kth).sum(1) > k  # more candidates at the k-th score than places left
    out = (vals, idx.gather(1, cols))
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        ri, order = idx[rows].sort(dim=1)  # column order = index order, as _first_k_columns needs
        rs = s[rows].gather(1, order)
        c = _first_k_columns(rs, kth[rows], k)
        out[0][rows], out[1][rows] = rs.gather(1, c), ri.gather(1, c)
    return out


def _score_block(qb: Tensor, gb: Tensor, inv_ng: Tensor | None, q0: int, n0: int, exclude_self: bool) -> Tensor:
    """Scores of one query block against one gallery chunk (own rows at -inf with exclude_self)."""
    if qb.device.type == "cpu":
        # The gallery chunk is the left operand: for a few queries MKL streams it ~2x faster
        # than through its GEMV path (one query is padded to two columns); above that oneDNN
        # is ~2x faster than MKL (_cpu_gemm). Reductions run on the contiguous [chunk, Q]
        # product; the caller gets its transposed view.
        if qb.shape[0] <= 4:
            st = gb @ (qb.repeat(2, 1) if qb.shape[0] == 1 else qb).T
        else:
            st = mm_nt(gb, qb)
        if inv_ng is not None:
            st *= inv_ng[:, None]
        s = st.T[:qb.shape[0]]
    else:
        st = s = qb @ gb.T
        if inv_ng is not None:
            s *= inv_ng
    # One cheap reduction instead of an isfinite pass: min/max propagate NaN and expose +-inf.
    lo, hi = torch.aminmax(st)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise _NonFinite()
    if exclude_self:
        rows = torch.arange(q0, q0 + qb.shape[0], device=qb.device)
        own = (rows >= n0) & (rows < n0 + gb.shape[0])
        s[own.nonzero()[:, 0], rows[own] - n0] = -math.inf
    return s


class _NonFinite(Exception):
    """A block produced NaN/inf scores; the caller names the input that holds them."""


def cosine_topk(queries, gallery, k: int, *, normalize: bool = True, exclude_self: bool = False,
                chunk_size: int | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine (or inner-product) search.

    Args:
        queries: [Q, d] tensor or numpy array (fp32 / fp16 / bf16 / fp64).
        gallery: [N, d] tensor on the queries' device, or a CPU tensor / numpy array / memmap
            with CUDA queries (streamed to the device in chunks: galleries larger than memory).
        k: neighbours per query, 1 <= k <= N (N - 1 with ``exclude_self``).
        normalize: L2-normalize both sides (cosine); False scores raw inner products. An
            all-zero row has no direction: it scores 0 against everything (the convention of
            ``torch.nn.functional.normalize`` / ``cosine_similarity``).
        exclude_self: query i is gallery row i (queries are the first Q gallery rows, e.g. the
            same set): drop that row from query i's results (leave-one-out retrieval).
        chunk_size: gallery rows per block (default: ~16M scores per block).
        progress: show a tqdm bar over gallery chunks.

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)`` on the queries' device, sorted by score
        descending with ties to the lower gallery index.

    Raises:
        ValueError / TypeError naming the argument: bad shapes, k out of range, empty gallery,
        dim mismatch, mixed devices, NaN/inf rows.
    """
    q = _host_tensor(queries) if isinstance(queries, np.ndarray) else queries
    q = check_matrix(q, "queries")
    g = _check_gallery(gallery, "gallery")
    g_dev = torch.device("cpu") if isinstance(g, np.ndarray) else g.device
    streamed = q.device.type == "cuda" and g_dev.type == "cpu"
    if g_dev != q.device and not streamed:
        raise ValueError(f"gallery: on {g_dev}, but queries are on {q.device} (a CPU gallery may "
                         "be streamed to CUDA queries; other mixes are not supported)")
    Q, N = q.shape[0], g.shape[0]
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: has dim {g.shape[1]} but queries have dim {q.shape[1]}")
    if exclude_self and Q > N:
        raise ValueError(f"exclude_self: query i must be gallery row i, but there are {Q} queries "
                         f"and only {N} gallery rows")
    limit = N - 1 if exclude_self else N
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an integer in [1, {limit}] (gallery size"
                         f"{' - 1 with exclude_self' if exclude_self else ''}), got {k!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")

    g_is_f64 = (g.dtype == np.float64) if isinstance(g, np.ndarray) else g.dtype == torch.float64
    acc = torch.float64 if (q.dtype == torch.float64 or g_is_f64) else torch.float32
    qn = q.to(acc)
    if normalize:
        qn = torch.nn.functional.normalize(qn, dim=1)
    if not bool(torch.isfinite(qn).all()):
        raise nonfinite_error({"queries": q})
    # ~8k-row chunks keep the GEMM in cache; the query block bounds one score block to 64 MiB.
    chunk = max(k, chunk_size or min(N, _DEFAULT_CHUNK))
    q_block = max(1, min(Q, _BLOCK_ELEMS // chunk))
    g_dtype = _torch_dtype(g)
    use_kernel = (q.device.type == "cuda" and acc == torch.float32
                  and _native.topk_kernel_applies(q.dtype, g_dtype, k))
    if q.device.type == "cuda" and not use_kernel and acc == torch.float32:
        warn_fallback("cosine_topk")

    out_s = torch.empty(Q, k, dtype=acc, device=q.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=q.device)
    # Gallery-chunk-major order: the gallery is read (and streamed) once, the queries stay put.
    chunks = _gallery_chunks(g, chunk, q.device, None if use_kernel else acc)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, total=math.ceil(N / chunk), desc="cosine_topk", unit="chunk")
    native_select = (q.device.type == "cpu" and acc == torch.float32 and _native.cpu_select_available())
    running = [_native.CpuRunningTopk(min(q_block, Q - q0), k) if native_select else _RunningTopk(k)
               for q0 in range(0, Q, q_block)]
    for n0, gb in chunks:
        # Scale the scores instead of normalizing the chunk: one pass over it fewer.
        inv_ng = inv_row_norms(gb) if (normalize and not use_kernel) else None
        for b, q0 in enumerate(range(0, Q, q_block)):
            qb = qn[q0:q0 + q_block]
            try:
                if use_kernel:
                    new = _native.cosine_topk_block(q[q0:q0 + q_block], gb, min(k, gb.shape[0]), normalize,
                                                    q0 if exclude_self else -1, n0)
                    running[b].merge(new)
                else:
                    running[b].add(_score_block(qb, gb, inv_ng, q0, n0, exclude_self), n0)
            except _NonFinite:
                raise nonfinite_error({"queries": q[q0:q0 + q_block], "gallery": _rows(g, n0, gb.shape[0])}) from None
    for b, q0 in enumerate(range(0, Q, q_block)):
        out_s[q0:q0 + q_block], out_i[q0:q0 + q_block] = running[b].flush()
    return out_s.to(torch.float32), out_i


def _rows(g, n0: int, rows: int) -> Tensor:
    part = g[n0:n0 + rows]
    return _host_tensor(part) if isinstance(part, np.ndarray) else part


class KnnFunc:
    """A ``knn_func`` for pytorch-metric-learning's ``AccuracyCalculator``.

    PML calls ``knn_func(query, k, reference, ref_includes_query)`` and expects ``(distances,
    indices)`` of shape [Q, k]; with ``ref_includes_query`` the first Q reference rows are the
    queries and each query's own row must be left out. Returned "distances" are cosine
    similarities (larger is nearer), as PML's own ``CosineSimilarity`` knn does.

    Example::

        calc = AccuracyCalculator(knn_func=KnnFunc())
    """

    def __init__(self, *, normalize: bool = True, chunk_size: int | None = None):
        self.normalize = normalize
        self.chunk_size = chunk_size

    def __call__(self, query, k: int, reference, ref_includes_query: bool = False) -> tuple[Tensor, Tensor]:
        limit = reference.shape[0] - (1 if ref_includes_query else 0)
        return cosine_topk(query, reference, min(int(k), limit), normalize=self.normalize,
                           exclude_self=ref_includes_query, chunk_size=self.chunk_size)
