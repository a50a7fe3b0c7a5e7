"""Exact top-k cosine search of queries against a gallery, in bounded memory (the op).

``cosine_topk`` scores ``query_block x chunk_size`` similarity blocks, reduces each to its top-k
and merges, so the Q x N score matrix never exists. The provider is picked by
:func:`bct_fast.ops.providers.choose`: for CUDA tensors the verified tensor-core providers
(:mod:`bct_fast.ops.topk_fused` for up to 128 bf16 queries, :mod:`bct_fast.ops.topk_epilogue`
otherwise), the SIMT kernel (:mod:`bct_fast.ops.topk_cuda`) on request, and this chunked PyTorch
path for what they cannot serve (a host gallery streamed to the GPU, k > 4096, fp64). On a CPU the
score blocks come from oneDNN (:mod:`bct_fast.ops.cpu_gemm`) and the running top-k is kept by
the extension's C++ selector when it is built, else by the PyTorch one
(:mod:`bct_fast.ops.topk_select`). On a GPU the running top-k keeps fixed shapes
(``DeviceRunningTopk``: no host sync per block; rows whose final k-th best ties at a block's
k-th place are redone exactly at the end) and non-finite scores are checked once, after the loop. Results are exact,
sorted by score descending, ties to the lower gallery index.

Galleries larger than device memory: pass the gallery as a CPU tensor or a numpy array / memmap
with CUDA queries; chunks are copied through pinned memory and merged on the device.
"""
from __future__ import annotations

import functools
import math
import mmap
import numbers
import os
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from bct_fast._core.arrays import dlpack_view, host_tensor
from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import check_matrix, nonfinite_error
from bct_fast.ops import topk_cuda, topk_epilogue, topk_fused, topk_screen, topk_select
from bct_fast.ops.cpu_gemm import mm_nt
from bct_fast.ops.providers import Unsupported, check_backend, choose, note_fallback
from bct_fast.ops.rows import inv_row_norms, inv_row_norms_stepped, mask_one_column, normalize_rows
from bct_fast.ops.topk_select import DeviceRunningTopk, NonFiniteScores, RunningTopk

__all__ = ["cosine_topk"]

_BLOCK_ELEMS = 1 << 24  # scores per block at most: 16M fp32 = 64 MiB
_DEFAULT_CHUNK = 8192   # gallery rows per chunk
_MIN_CHUNK = 1024       # below this the per-call GEMM / selection overheads dominate
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_ROW_MAJOR_QUERIES = 64  # from this many queries per block the CPU product is [Q, chunk]
# fp32 bytes of one CPU gallery chunk read in place at most (a tensor view, or the pages of a
# memory-mapped range held until they are released).
_CPU_CHUNK_BYTES = 32 << 20
_CPU_CONVERTED_BYTES = 8 << 20  # fp32 bytes of a converted (upcast) CPU chunk: L3-resident


def block_shape(Q: int, N: int, d: int, k: int, device_type: str, chunk_size: int | None = None,
                in_place: bool = True) -> tuple[int, int]:
    """(gallery rows per chunk, queries per block) of one score block.

    On a CPU a block is written by the GEMM and read back by the selection: at small d the
    product is bound by those writes, so the block is kept near the caches (~2M scores at
    d = 128, growing with d, at most 16M); at Q = 2000, d = 128 that halves the GEMM time
    (benchmarks/NOTES.md). With few queries the chunk grows to fill that target, within 32 MiB
    of rows, when the gallery is read ``in_place``; a gallery converted chunk by chunk (fp16 /
    bf16 rows upcast into one reused buffer) keeps chunks of about 8 MiB of fp32 rows, which the
    product then reads from the cache (a 65536-row fp16 chunk at Q = 16, d = 128 took 2.4x
    longer than 8192 rows). A user's ``chunk_size`` is kept as given, up to N (a larger one would
    only shrink the query blocks and, for a host gallery headed for a GPU, size its pinned
    staging buffers)."""
    cache_sized = device_type == "cpu" and not chunk_size
    target = min(_BLOCK_ELEMS, max(1 << 20, (1 << 21) * d // 128)) if cache_sized else _BLOCK_ELEMS
    chunk = chunk_size or min(N, _DEFAULT_CHUNK)
    if cache_sized:
        # Few queries: a chunk wider than the default (up to the score target and 32 MiB of
        # rows) saves per-chunk calls; Q = 1, N = 1M, d = 64 went from 18 to 11 ms.
        rows_cap = _CPU_CHUNK_BYTES // (4 * d) if in_place else max(_MIN_CHUNK, _CPU_CONVERTED_BYTES // (4 * d))
        chunk = min(N, rows_cap, max(_MIN_CHUNK, target // max(Q, 1)))
    chunk = min(N, max(k, chunk))
    return chunk, max(1, min(Q, target // chunk))


def _check_gallery(g, name: str):
    """A torch matrix, or a 2-D float numpy array / memmap (kept on the host, read by chunks)."""
    if isinstance(g, np.ndarray):
        if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
            raise ValueError(f"{name}: expected a non-empty 2-D array [rows, dim], got shape {g.shape}")
        if g.dtype.type not in _NUMPY_FLOATS:
            raise TypeError(f"{name}: numpy dtype {g.dtype} is not supported (float16/32/64)")
        return g
    return check_matrix(g, name)


def _torch_dtype(g) -> torch.dtype:
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[g.dtype.type] \
        if isinstance(g, np.ndarray) else g.dtype


def _keep_mapped_limit() -> int:
    """Bytes of a memory-mapped gallery up to which its pages stay mapped after a search: 1/8 of
    physical memory (0 where that cannot be read: every gallery is then released)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (ValueError, OSError, AttributeError):
        return 0


class _PageRelease:
    """Drops, after use, the pages of a large read-only numpy memmap that a gallery chunk read.

    Without it the pages read stay mapped, so after one pass over a memory-mapped gallery the
    whole file counted in the process's resident memory (1.5 GiB for two 0.5 GiB galleries in
    ``bct-fast compat``). Only the chunk's own page range is advised (advising the whole map per
    chunk made a 5M-row search 25% slower). For a read-only mapping MADV_DONTNEED drops clean
    pages only (a later read faults them back from the file); copy-on-write or writable maps are
    left alone, since dropping their pages would discard changes.

    A gallery of at most 1/8 of physical memory (:func:`_keep_mapped_limit`) is left mapped:
    faulting its pages back costs every later search about as much as reading it (5M x 64 fp32,
    1.3 GB: 150-160 ms released, 65 ms kept mapped, on the 2-core test machine), and it fits."""

    def __init__(self, g) -> None:
        self.mm = None
        advice = getattr(mmap, "MADV_DONTNEED", None)
        mm = getattr(g, "_mmap", None) if isinstance(g, np.memmap) and g.mode == "r" else None
        if mm is None or advice is None or not hasattr(mm, "madvise") or len(mm) <= _keep_mapped_limit():
            return
        try:
            view = np.frombuffer(mm, dtype=np.uint8, count=1)
            self.base = view.ctypes.data
            del view  # release the buffer export at once (the map must stay closable)
        except (ValueError, TypeError, BufferError):
            return
        self.mm, self.advice = mm, advice

    def __call__(self, part: np.ndarray) -> None:
        if self.mm is None:
            return
        start = part.ctypes.data - self.base
        lo = start - start % mmap.PAGESIZE
        try:
            self.mm.madvise(self.advice, lo, start + part.nbytes - lo)
        except (OSError, ValueError):  # a closed map or a platform without it: only memory is lost
            pass


def _read_only_view(part: np.ndarray) -> Tensor:
    """A tensor over a read-only, native, contiguous array's memory without a copy: the search
    only reads gallery chunks (torch warns about non-writable arrays; nothing writes here)."""
    if not (part.dtype.isnative and part.flags.c_contiguous):
        return host_tensor(part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(part)


def _gallery_chunks(g, chunk: int, device: torch.device, dtype: torch.dtype | None,
                    reuse: bool = False) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(row0, chunk on device)``. Host galleries headed for CUDA go through two pinned
    staging buffers: the host fills the next one while the GPU searches the current chunk (the
    transfer itself is queued on the search's stream, so it does not overlap the search). Memory-mapped
    galleries are read in place and their pages released after each chunk (_PageRelease).
    With ``reuse``, CPU chunks that need a dtype conversion are converted into one buffer that
    every chunk reuses (the consumer must be done with a chunk before asking for the next): a
    fresh 50 MB tensor per chunk cost ~7x the conversion itself in page faults."""
    N = g.shape[0]
    host = isinstance(g, np.ndarray) or g.device.type == "cpu"
    release = _PageRelease(g)
    if not (host and device.type == "cuda"):
        staging = None
        for n0 in range(0, N, chunk):
            part = g[n0:n0 + chunk]
            t = _read_only_view(part) if isinstance(part, np.ndarray) else part
            want = dtype or t.dtype
            if reuse and device.type == "cpu" and t.device.type == "cpu" and t.dtype != want:
                if staging is None:
                    staging = torch.empty(min(chunk, N), t.shape[1], dtype=want)
                yield n0, staging[:t.shape[0]].copy_(t)
            else:
                yield n0, t.to(device=device, dtype=want)
            if isinstance(part, np.ndarray):
                release(part)  # the consumer is done with this chunk
        return
    src_dtype = _torch_dtype(g)
    staging = [torch.empty(min(chunk, N), g.shape[1], dtype=src_dtype).pin_memory() for _ in range(2)]
    done = [None, None]
    for step, n0 in enumerate(range(0, N, chunk)):
        buf = staging[step % 2]
        if done[step % 2] is not None:
            done[step % 2].synchronize()  # the copy that last read this buffer has finished
        part = g[n0:n0 + chunk]
        rows = part.shape[0]
        buf[:rows].copy_(_read_only_view(part) if isinstance(part, np.ndarray) else part)
        if isinstance(part, np.ndarray):
            release(part)
        on_dev = buf[:rows].to(device, non_blocking=True)
        done[step % 2] = torch.cuda.Event()
        done[step % 2].record(torch.cuda.current_stream(device))
        yield n0, on_dev.to(dtype or on_dev.dtype)


def _block_product(qb: Tensor, gb: Tensor) -> tuple[Tensor, Tensor]:
    """The exact fp32 product of a block: ``(scores [Q, chunk], the tensor holding them)``.
    The screened path (:mod:`bct_fast.ops.topk_screen`) checks its rescoring against this."""
    if qb.device.type == "cpu" and qb.shape[0] >= _ROW_MAJOR_QUERIES:
        # Many queries: a row-major [Q, chunk] product; its GEMM and the selector's vectorized
        # per-query scan both beat the transposed layout from 64 queries on (benchmarks/NOTES.md).
        s = mm_nt(qb, gb)
        return s, s
    if qb.device.type == "cpu":
        # Few queries: the gallery chunk is the left operand, MKL streams it ~2x faster than
        # through its GEMV path (one query is padded to two columns). Reductions run on the
        # contiguous [chunk, Q] product; the caller gets its transposed view.
        if qb.shape[0] <= 4:
            st = gb @ (qb.repeat(2, 1) if qb.shape[0] == 1 else qb).T
        else:
            st = mm_nt(gb, qb)
        return st.T[:qb.shape[0]], st
    s = qb @ gb.T
    return s, s


def tensor_core_scores(q: Tensor, g_dtype: torch.dtype) -> bool:
    """Whether this path's score GEMMs take the bf16 operands as they are: bf16 queries and
    gallery on CUDA, bf16 x bf16 -> fp32 on the tensor cores (exact products, fp32 sums: the
    arithmetic of the fp32 GEMM of the same values), norms applied to the fp32 scores. Upcasting
    them for an fp32 GEMM measured ~5x slower than plain PyTorch on an H200
    (benchmarks/results/gpu_2026-11-26_h200.md)."""
    return q.is_cuda and q.dtype == torch.bfloat16 and g_dtype == torch.bfloat16


def _score_block(qb: Tensor, gb: Tensor, inv_ng: Tensor | None, q0: int, n0: int, exclude_self: bool,
                 inv_nq: Tensor | None = None,
                 on_nonfinite: Callable[[Tensor], None] | None = None) -> Tensor:
    """Scores of one query block against one gallery chunk (own rows at -inf with exclude_self:
    query j of the block is gallery row ``q0 + j``). bf16 blocks
    (:func:`tensor_core_scores`) get fp32 scores, scaled by ``inv_nq`` per row. NaN / inf scores
    raise :class:`NonFiniteScores`, or, with ``on_nonfinite``, go to it as a device-side flag
    (all finite?) without a host sync."""
    if qb.dtype == torch.bfloat16:
        s = st = topk_epilogue.default_product(qb, gb)
    else:
        s, st = _block_product(qb, gb)
    if inv_nq is not None:
        s *= inv_nq[:, None]
    if inv_ng is not None:
        if st is s:
            s *= inv_ng
        else:
            st *= inv_ng[:, None]
    # One cheap reduction instead of an isfinite pass: min/max propagate NaN and expose +-inf.
    lo, hi = torch.aminmax(st)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    if on_nonfinite is not None:
        on_nonfinite(finite)
    elif not bool(finite):
        raise NonFiniteScores()
    if exclude_self:
        mask_one_column(s, torch.arange(q0 - n0, q0 - n0 + qb.shape[0], device=qb.device))
    return s


def _sync_free(q: Tensor, acc: torch.dtype, N: int) -> bool:
    """On a GPU the chunked path keeps fixed shapes (:class:`topk_select.DeviceRunningTopk`) and
    checks for non-finite scores once, at the end: each host sync of the CPU selection stalls
    the GPU once per block."""
    return q.is_cuda and acc == torch.float32 and N - 1 <= topk_select.MAX_COMPOSITE_INDEX


@without_autocast
def cosine_topk(queries, gallery, k: int, *, normalize: bool = True, exclude_self: bool = False,
                chunk_size: int | None = None, progress: bool = False,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact top-k cosine (or inner-product) search.

    Args:
        queries: [Q, d] tensor, numpy array or DLPack producer (cupy, JAX: viewed without a
            copy) (fp32 / fp16 / bf16 / fp64).
        gallery: [N, d] tensor / DLPack producer on the queries' device, or a CPU tensor / numpy
            array / memmap with CUDA queries (streamed to the device in chunks: galleries larger
            than memory).
        k: neighbours per query, 1 <= k <= N (N - 1 with ``exclude_self``).
        normalize: L2-normalize both sides (cosine); False scores raw inner products. An
            all-zero row has no direction: it scores 0 against everything (the convention of
            ``torch.nn.functional.normalize`` / ``cosine_similarity``).
        exclude_self: query i is gallery row i (queries are the first Q gallery rows, e.g. the
            same set): drop that row from query i's results (leave-one-out retrieval).
        chunk_size: gallery rows per block (default: ~16M scores per block).
        progress: show a tqdm bar over gallery chunks.
        backend: ``"auto"`` (on CUDA tensors the fastest verified provider that can serve the
            call: ``"fused"`` for up to 128 bf16 queries and k <= 128, else ``"epilogue"``; the
            chunked PyTorch path for the rest), ``"cuda"`` (the SIMT kernel, or an error saying
            why it cannot serve the call),
            ``"epilogue"`` (cuBLAS score blocks + the top-k selection kernel, k <= 4096; on CPU
            tensors the same loop with its PyTorch twin: :mod:`bct_fast.ops.topk_epilogue`),
            ``"fused"`` (tensor-core score tiles with the selection in shared memory, bf16
            queries and gallery on CUDA, k <= 128: :mod:`bct_fast.ops.topk_fused`) or
            ``"torch"`` (:mod:`bct_fast.ops.providers`).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)`` on the queries' device, sorted by score
        descending with ties to the lower gallery index.

    Raises:
        ValueError / TypeError naming the argument: bad shapes, k out of range, empty gallery,
        dim mismatch, mixed devices, NaN/inf rows.
    """
    check_backend(backend)
    queries, gallery = dlpack_view(queries, "queries"), dlpack_view(gallery, "gallery")
    q = host_tensor(queries) if isinstance(queries, np.ndarray) else queries
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
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an integer in [1, {limit}] (gallery size"
                         f"{' - 1 with exclude_self' if exclude_self else ''}), got {k!r}")
    k = int(k)  # numpy integers too
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")

    g_is_f64 = _torch_dtype(g) == torch.float64
    acc = torch.float64 if (q.dtype == torch.float64 or g_is_f64) else torch.float32
    qn = q.to(acc)
    if normalize:
        qn = normalize_rows(qn)
    if not bool(torch.isfinite(qn).all()):
        raise nonfinite_error({"queries": q})
    g_dtype = _torch_dtype(g)
    chunk, q_block = block_shape(Q, N, q.shape[1], k, q.device.type, chunk_size, in_place=g_dtype == acc)
    choice = choose("cosine_topk", q.device, backend, lambda: topk_cuda.unsupported(q.dtype, g_dtype, k),
                    lambda: _epilogue_unsupported(g, g_dtype, q.dtype, k, streamed),
                    lambda: _fused_unsupported(g, g_dtype, q, k, streamed), rows=Q)
    note_fallback("cosine_topk", choice)
    if choice.provider == "fused":  # tensor-core tiles, selection in shared memory (bf16, k <= 128)
        return topk_fused.cosine_topk_fused(q, g, k, normalize, exclude_self, chunk_size=chunk_size)
    if choice.provider == "epilogue":  # library GEMMs + the selection kernel (or its twin on a CPU)
        return topk_epilogue.cosine_topk_epilogue(q, g, k, normalize, exclude_self, chunk_size)
    use_kernel = choice.provider == "cuda"
    bf16_scores = not use_kernel and tensor_core_scores(q, g_dtype)
    # bf16 GEMMs: the raw query rows, their norms applied to the scores (the gallery's likewise).
    q_rows, inv_nq = (q, inv_row_norms(q, acc) if normalize else None) if bf16_scores else (qn, None)

    plan = None if use_kernel else _screen_plan(qn, g, k, chunk, q_block, normalize, exclude_self)
    if plan is not None:
        try:
            return _screened_search(plan, qn, g, chunk, q_block, normalize, progress)
        except NonFiniteScores:
            pass  # the exact path names the non-finite input (or copes with a bound it broke)

    out_s = torch.empty(Q, k, dtype=acc, device=q.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=q.device)
    # Gallery-chunk-major order: the gallery is read (and streamed) once, the queries stay put.
    chunks = _progress(_gallery_chunks(g, chunk, q.device, None if (use_kernel or bf16_scores) else acc,
                                       reuse=True), N, chunk, progress)
    native_select = (q.device.type == "cpu" and not use_kernel and acc == torch.float32
                     and topk_select.cpu_select_available())
    deferred = not use_kernel and not native_select and _sync_free(q, acc, N)
    starts = range(0, Q, q_block)
    if deferred:
        running = [DeviceRunningTopk(min(q_block, Q - q0), k, q.device) for q0 in starts]
    else:
        running = [topk_select.CpuRunningTopk(min(q_block, Q - q0), k) if native_select else RunningTopk(k)
                   for q0 in starts]
    first_bad = torch.full((), -1, dtype=torch.int64, device=q.device) if deferred else None  # first non-finite block
    blocks: list[tuple[int, int, int]] = []                            # deferred: (q0, n0, rows) per block
    # A GPU-resident gallery's inverse norms up front (row_norms checks its rows on the host:
    # once per million rows instead of once per chunk); on a CPU each chunk's, while it is cached.
    inv_ng_all = (inv_row_norms_stepped(g, acc) if deferred and normalize and isinstance(g, Tensor)
                  and g.device == q.device else None)
    for n0, gb in chunks:
        # Scale the scores instead of normalizing the chunk: one pass over it fewer.
        inv_ng = _chunk_inv_norms(inv_ng_all, gb, n0, acc, normalize and not use_kernel)
        for b, q0 in enumerate(starts):
            qb = q_rows[q0:q0 + q_block]
            try:
                if use_kernel:
                    new = topk_cuda.cosine_topk_block(q[q0:q0 + q_block], gb, min(k, gb.shape[0]), normalize,
                                                    q0 if exclude_self else -1, n0)
                    running[b].merge(new)
                    continue
                note = None
                if deferred:
                    blocks.append((q0, n0, gb.shape[0]))
                    note = functools.partial(_note_first_bad, first_bad, len(blocks) - 1)
                running[b].add(_score_block(qb, gb, inv_ng, q0, n0, exclude_self,
                                            None if inv_nq is None else inv_nq[q0:q0 + q_block],
                                            on_nonfinite=note), n0)
            except NonFiniteScores:
                raise nonfinite_error({"queries": q[q0:q0 + q_block], "gallery": _rows(g, n0, gb.shape[0])}) from None
    for b, q0 in enumerate(starts):
        out_s[q0:q0 + q_block], out_i[q0:q0 + q_block] = running[b].flush()
    if deferred:
        bad = int(first_bad)  # the one host sync of the loop
        if bad >= 0:
            q0, n0, rows = blocks[bad]
            raise nonfinite_error({"queries": q[q0:q0 + q_block], "gallery": _rows(g, n0, rows)})
        redo = torch.cat([r.ambiguous for r in running]).nonzero()[:, 0]
        if redo.numel():  # the final k-th best tied at a block's k-th place: the exact selection
            out_s[redo], out_i[redo] = _exact_rows(redo, q_rows, inv_nq, inv_ng_all, g, k, chunk, q_block,
                                                   acc, bf16_scores, normalize, exclude_self)
    return out_s.to(torch.float32), out_i


def _chunk_inv_norms(inv_ng_all: Tensor | None, gb: Tensor, n0: int, acc: torch.dtype,
                     normalize: bool) -> Tensor | None:
    """The chunk's inverse norms: a slice of the precomputed ones, else computed now."""
    if inv_ng_all is not None:
        return inv_ng_all[n0:n0 + gb.shape[0]]
    return inv_row_norms(gb, acc) if normalize else None


def _note_first_bad(first_bad: Tensor, block: int, finite: Tensor) -> None:
    """Record ``block`` as the first with non-finite scores (on the device, no sync)."""
    first_bad.copy_(torch.where((first_bad < 0) & ~finite, block, first_bad))


def _exact_rows(redo: Tensor, q_rows: Tensor, inv_nq: Tensor | None, inv_ng_all: Tensor | None, g, k: int,
                chunk: int, q_block: int, acc: torch.dtype, bf16_scores: bool, normalize: bool,
                exclude_self: bool) -> tuple[Tensor, Tensor]:
    """The top-k of the query rows ``redo`` (sorted ids) by :class:`RunningTopk` (exact ties; host
    syncs per block), over a second pass of the gallery. The query blocks that hold them are
    scored again whole, with the first pass's norms, so their scores have the first pass's bits;
    the inputs are known finite."""
    which = (redo // q_block).tolist()
    local = {b: redo[redo // q_block == b] - b * q_block for b in sorted(set(which))}
    running = {b: RunningTopk(k) for b in local}
    for n0, gb in _gallery_chunks(g, chunk, q_rows.device, None if bf16_scores else acc, reuse=True):
        inv_ng = _chunk_inv_norms(inv_ng_all, gb, n0, acc, normalize)
        for b, rows in local.items():
            q0 = b * q_block
            s = _score_block(q_rows[q0:q0 + q_block], gb, inv_ng, q0, n0, exclude_self,
                             None if inv_nq is None else inv_nq[q0:q0 + q_block])
            running[b].add(s[rows], n0)
    parts = [running[b].flush() for b in local]  # blocks in ascending order, as ``redo``
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _epilogue_unsupported(g, g_dtype: torch.dtype, q_dtype: torch.dtype, k: int, streamed: bool):
    """Why the epilogue provider (:mod:`bct_fast.ops.topk_epilogue`) cannot serve this call."""
    if isinstance(g, np.ndarray) or streamed:
        return Unsupported("a numpy or host-streamed gallery (the epilogue provider takes the gallery "
                           "as a tensor on the queries' device)")
    return topk_epilogue.unsupported(q_dtype, g_dtype, k)


def _fused_unsupported(g, g_dtype: torch.dtype, q: Tensor, k: int, streamed: bool):
    """Why the fused provider (:mod:`bct_fast.ops.topk_fused`) cannot serve this call."""
    if isinstance(g, np.ndarray) or streamed:
        return Unsupported("a numpy or host-streamed gallery (the fused provider takes the gallery "
                           "as a tensor on the queries' device)")
    return topk_fused.unsupported(q, g_dtype, k)


def _progress(chunks: Iterator[tuple[int, Tensor]], N: int, chunk: int, progress: bool) -> Iterator[tuple[int, Tensor]]:
    if not progress:
        return chunks
    from tqdm.auto import tqdm
    return tqdm(chunks, total=math.ceil(N / chunk), desc="cosine_topk", unit="chunk")


# ---- bf16 screening (issue 16; bct_fast/ops/topk_screen.py) ------------------------------------
# None: BCT_FAST_SCREEN (default "auto": where _screen_pays); True / False force it on / off
# wherever it can apply (tests compare both on the same inputs).
_SCREEN: bool | None = None
_SCREEN_MAX_KEPT = 1 << 25  # screened (score, index) pairs kept at once (~400 MB)
_last_screen_stats: dict = {}  # the last screened call's query / candidate counts (tests, benchmarks)


def _screen_pays(Q: int, N: int, d: int, k: int) -> bool:
    """Where the screened search measured faster than the exact one (fp32 CPU, 2-core AVX512-BF16
    EPYC, benchmarks/results/cpu_search_screen_2026-11-25.md): GEMM-bound searches. It halves
    the GEMM but adds O(N d) conversion passes (paid back from ~1000 queries), per-query
    candidate windows that grow with k (k = 10 won, k = 100 tied or lost: the cut at 32 is
    between the measured points; k = 1000: ~1500 rescored rows per query, 2-3x slower) and,
    at d <= 128, a GEMM too small to matter next to the selection."""
    return Q >= 1000 and d >= 256 and k <= 32 and N >= 100_000


def _screen_plan(qn: Tensor, g, k: int, chunk: int, q_block: int, normalize: bool,
                 exclude_self: bool) -> topk_screen.ScreenedSearch | None:
    """A screened search for this call, or None where it is off, would not pay, or cannot
    reproduce the exact path's bits (no checked rescoring product for a block shape)."""
    mode = topk_screen.screen_mode() if _SCREEN is None else ("on" if _SCREEN else "off")
    (Q, d), N = qn.shape, g.shape[0]
    if mode == "off" or qn.device.type != "cpu" or qn.dtype != torch.float32:
        return None
    if mode == "auto" and not _screen_pays(Q, N, d, k):
        return None
    rankable = N - 1 if exclude_self else N  # own rows score -inf: never selected
    k_screen = topk_screen.default_k_screen(k, rankable)
    if Q * k_screen > _SCREEN_MAX_KEPT or not topk_screen.bf16_product_is_fp32_accumulated(qn.device):
        return None
    rows = {min(q_block, Q - q0) for q0 in (0, (Q - 1) // q_block * q_block)}
    cols = {min(chunk, N - n0) for n0 in (0, (N - 1) // chunk * chunk)}
    product = topk_screen.rescore_product(lambda a, b: _block_product(a, b)[0], {(r, c) for r in rows for c in cols},
                                          d, qn.device)
    if product is None:
        return None
    plan = topk_screen.ScreenedSearch(k, k_screen, N, rankable, normalize, exclude_self)
    for q0 in range(0, Q, q_block):
        plan.add_block(q0, qn[q0:q0 + q_block], product)
    return plan


def _screened_search(plan: topk_screen.ScreenedSearch, qn: Tensor, g, chunk: int, q_block: int, normalize: bool,
                     progress: bool) -> tuple[Tensor, Tensor]:
    """The screened pass over the gallery, the rescoring of the candidates, and the exact pass
    for the queries whose candidate window overflowed (rare; bounded memory)."""
    N, d = g.shape
    # bf16 conversion and bound reductions over super-chunks of up to 64 MB: fewer parallel
    # regions (each one a barrier for the OpenMP workers); products and norms stay per chunk.
    big = chunk * max(1, min(16, (1 << 24) // (chunk * d)))
    for n0, gb in _progress(_gallery_chunks(g, big, qn.device, qn.dtype), N, big, progress):
        inv = torch.cat([inv_row_norms(gb[j:j + chunk]) for j in range(0, gb.shape[0], chunk)]) if normalize else None
        plan.add_chunk(gb, inv, n0, chunk)
    plan.finish()
    plan.rescore(lambda idx: _gather_rows(g, idx, qn.device, qn.dtype))
    if plan.needs_exact_pass:
        for n0, gb in _gallery_chunks(g, chunk, qn.device, qn.dtype):
            plan.exact_chunk(gb, n0)
    parts = plan.results()
    _last_screen_stats.clear()
    _last_screen_stats.update(plan.stats)
    return torch.cat([p[1] for p in parts]).to(torch.float32), torch.cat([p[2] for p in parts])


def _gather_rows(g, idx: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Gallery rows ``idx`` converted like a chunk (same values as the exact path's rows)."""
    if isinstance(g, np.ndarray):
        return host_tensor(g[idx.cpu().numpy()]).to(device=device, dtype=dtype)
    return g[idx.to(g.device)].to(device=device, dtype=dtype)


def _rows(g, n0: int, rows: int) -> Tensor:
    part = g[n0:n0 + rows]
    return host_tensor(part) if isinstance(part, np.ndarray) else part
