"""Exact running top-k selection: the tie rule (equal scores -> lower gallery index) in one place.

``RunningTopk`` (PyTorch, any device), ``DeviceRunningTopk`` (PyTorch in fixed shapes, for
GPUs: no host sync per block) and ``CpuRunningTopk`` (the extension's C++ selector,
csrc/cpu/topk_select_cpu.cpp) keep the best k of a query block over gallery chunks; all return
rows sorted by score descending, ties by ascending gallery index.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from bct_fast._core.extension import native


class NonFiniteScores(Exception):
    """A block produced NaN/inf scores; the caller names the input that holds them."""


def _sort_rows_by_score_then_column(vals: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by score descending, equal scores by ascending column."""
    cols, perm = cols.sort(dim=1)
    vals = vals.gather(1, perm)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def topk_lowest_index_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
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


class RunningTopk:
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


# ---- running top-k without host synchronization (for GPUs) -------------------------------------
# RunningTopk sizes its candidate buffers from the data (nonzero, a max read back): on a GPU each
# block then waits for the host. DeviceRunningTopk keeps only fixed shapes: each block's top-k by
# torch.topk, merged as composite int64 keys (orderable score bits, then the inverted gallery
# index), which order (score desc, index asc) exactly. torch.topk alone breaks a tie at a block's
# k-th place arbitrarily; such rows are flagged (on the device) and recomputed by the caller.

_INDEX_BITS = 31
_INDEX_MASK = (1 << _INDEX_BITS) - 1
MAX_COMPOSITE_INDEX = _INDEX_MASK  # gallery indices up to 2^31 - 1


def composite_keys(scores: Tensor, index: Tensor) -> Tensor:
    """int64 keys with key order = (score descending, index ascending): the fp32 bits mapped to
    an unsigned order (-0 counted as +0) in the high bits, 2^31 - 1 - index in the low 31."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ordered = torch.where(bits >= 1 << 31, (~bits) & 0xFFFFFFFF, bits | (1 << 31))
    return (ordered << _INDEX_BITS) | (_INDEX_MASK - index)


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(fp32 scores, int64 indices) of :func:`composite_keys`."""
    ordered = keys >> _INDEX_BITS
    bits = torch.where(ordered >= 1 << 31, ordered & 0x7FFFFFFF, (~ordered) & 0xFFFFFFFF)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)  # as a signed 32-bit value
    return bits.to(torch.int32).view(torch.float32), _INDEX_MASK - (keys & _INDEX_MASK)


class DeviceRunningTopk:
    """The running top-k of one query block over gallery chunks, in fixed shapes (no host sync).

    Exact except where a block holds more scores equal to its k-th best ``v`` than the k places
    take (torch.topk picks among them arbitrarily) AND the row's final k-th best equals ``v``:
    the final k-th best is never below ``v`` (that block alone kept k scores >= v), and when it
    is above, no score ``v`` is in the result, so the block's choice among them does not matter.
    Those rows are :attr:`ambiguous` (the tie rule needs the lower indices) and the caller
    recomputes them with :class:`RunningTopk`. Per row only the largest such ``v`` is kept."""

    def __init__(self, rows: int, k: int, device: torch.device):
        self.k = k
        self.keys: Tensor | None = None  # [rows, <= k] composite keys, descending
        # Per row the largest k-th best of a block with more ties there than places (-inf: none).
        self.tie_floor = torch.full((rows,), -math.inf, dtype=torch.float32, device=device)

    def add(self, s: Tensor, n0: int) -> None:
        """Scores [rows, n] (fp32) of gallery rows n0 .. n0 + n - 1 (n0 + n <= 2^31)."""
        kk = min(self.k, s.shape[1])
        vals, cols = torch.topk(s, kk, dim=1)
        if kk < s.shape[1]:
            kth = vals[:, -1:]
            tied = (s == kth).sum(1) > (vals == kth).sum(1)
            self.tie_floor = torch.maximum(self.tie_floor, torch.where(tied, kth[:, 0].float(), -math.inf))
        keys = composite_keys(vals, cols + n0)
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], 1)
        self.keys = torch.topk(keys, min(self.k, keys.shape[1]), dim=1).values

    @property
    def ambiguous(self) -> Tensor:
        """[rows] bool: the rows whose result a block's arbitrary choice among ties may have
        changed (a tied ``v`` equal to the final k-th best score)."""
        if self.keys is None:
            return torch.zeros_like(self.tie_floor, dtype=torch.bool)
        final_kth = decode_keys(self.keys[:, -1])[0]
        return (self.tie_floor > -math.inf) & (self.tie_floor >= final_kth)

    def flush(self) -> tuple[Tensor, Tensor]:
        """(scores, indices) sorted by score descending, ties by ascending gallery index."""
        return decode_keys(self.keys)


# ---- CPU running top-k (csrc/cpu/topk_select_cpu.cpp) -----------------------------------------
# Module switch: tests turn it off to run the pure-PyTorch selection on the same inputs.
USE_CPU_SELECT = True


def cpu_select_available() -> bool:
    """The extension's C++ running top-k can serve fp32 CPU score blocks."""
    mod = native()
    return USE_CPU_SELECT and mod is not None and hasattr(mod, "TopkSelector")


class CpuRunningTopk:
    """Exact running top-k of Q queries over fp32 CPU score blocks, in C++: one pass over each
    block, candidates above a per-query threshold kept in a buffer that is compacted with a
    radix select of the k-th key (amortized O(1) per candidate). Same contract as :class:`RunningTopk`."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self._sel = native().TopkSelector(queries, k)

    def add(self, s: torch.Tensor, n0: int) -> None:
        """Scores [Q, n] (any strides, float32, CPU, no NaN) of gallery rows n0 .. n0 + n - 1."""
        if s.dtype != torch.float32 or s.device.type != "cpu":
            raise TypeError("CpuRunningTopk.add: expected a float32 CPU tensor")
        self._sel.add_block(s.data_ptr(), s.shape[1], s.stride(0), s.stride(1), n0, torch.get_num_threads())

    def flush(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k sorted by score descending, ties by ascending gallery index."""
        scores = torch.empty(self._sel.queries, self.k, dtype=torch.float32)
        index = torch.empty(self._sel.queries, self.k, dtype=torch.int64)
        self._sel.finish(scores.data_ptr(), index.data_ptr(), torch.get_num_threads())
        return scores, index
