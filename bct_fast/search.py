"""Exact top-k cosine search of queries against a gallery, in bounded memory.

This module holds the chunked PyTorch path (CPU, and any device): similarity blocks of
``query_block x chunk_size`` are scored, reduced to their top-k and merged, so the Q x N score
matrix never exists. Results are exact, sorted by score descending, ties to the lower index.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bct_fast._checks import check_matrix, nonfinite_error

__all__ = ["cosine_topk"]

_BLOCK_ELEMS = 1 << 24  # scores per block: 16M fp32 = 64 MiB


def _as_tensor(a, name: str) -> Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return check_matrix(a, name)


def _topk_lowest_index_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k per row, descending, equal scores ordered by ascending column (exact tie rule)."""
    vals, _ = torch.topk(scores, k, dim=1)
    kth = vals[:, -1:]
    above = scores > kth
    need = k - above.sum(1, keepdim=True)
    equal = scores == kth
    take = above | (equal & (torch.cumsum(equal, dim=1) <= need))
    cols = take.nonzero()[:, 1].view(scores.shape[0], k)  # ascending column order per row
    picked = scores.gather(1, cols)
    order = torch.sort(picked, dim=1, descending=True, stable=True).indices
    return picked.gather(1, order), cols.gather(1, order)


def cosine_topk(queries, gallery, k: int, *, normalize: bool = True, exclude_self: bool = False,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine (or inner-product) search.

    Args:
        queries: [Q, d] tensor or numpy array (fp32 / fp16 / bf16 / fp64).
        gallery: [N, d] on the same device as ``queries``.
        k: neighbours per query, 1 <= k <= N (N - 1 with ``exclude_self``).
        normalize: L2-normalize both sides (cosine); False scores raw inner products.
        exclude_self: queries ARE the gallery (same rows, same order): drop each query's own
            row (leave-one-out retrieval).
        chunk_size: gallery rows per block (default: ~16M scores per block).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)``, sorted by score descending with ties
        to the lower gallery index.
    """
    q = _as_tensor(queries, "queries")
    g = _as_tensor(gallery, "gallery")
    if q.device != g.device:
        raise ValueError(f"gallery: on {g.device}, but queries are on {q.device}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: has dim {g.shape[1]} but queries have dim {q.shape[1]}")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError("exclude_self: queries and gallery must be the same rows "
                         f"(got {q.shape[0]} queries, {g.shape[0]} gallery rows)")
    N = g.shape[0]
    limit = N - 1 if exclude_self else N
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an integer in [1, {limit}] (gallery size"
                         f"{' - 1 with exclude_self' if exclude_self else ''}), got {k!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")

    acc = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    qn = q.to(acc)
    if normalize:
        qn = torch.nn.functional.normalize(qn, dim=1)
    chunk = max(k, chunk_size or min(N, max(1024, _BLOCK_ELEMS // max(1, min(q.shape[0], 4096)))))
    q_block = max(1, min(q.shape[0], _BLOCK_ELEMS // chunk))
    out_s = torch.empty(q.shape[0], k, dtype=acc, device=q.device)
    out_i = torch.empty(q.shape[0], k, dtype=torch.int64, device=q.device)
    for q0 in range(0, q.shape[0], q_block):
        qb = qn[q0:q0 + q_block]
        best_s = best_i = None
        for n0 in range(0, N, chunk):
            gb = g[n0:n0 + chunk].to(acc)
            if normalize:
                gb = torch.nn.functional.normalize(gb, dim=1)
            s = qb @ gb.T
            if not bool(torch.isfinite(s).all()):
                raise nonfinite_error({"queries": q[q0:q0 + q_block], "gallery": g[n0:n0 + chunk]})
            if exclude_self:
                rows = torch.arange(q0, q0 + qb.shape[0], device=q.device)
                own = (rows >= n0) & (rows < n0 + gb.shape[0])
                s[own.nonzero()[:, 0], rows[own] - n0] = -math.inf
            if best_s is not None:  # merge: earlier candidates first, so index order holds for ties
                s = torch.cat([best_s, s], 1)
            kk = min(k, s.shape[1])
            best_s, cols = _topk_lowest_index_ties(s, kk)
            new_idx = torch.arange(n0, n0 + gb.shape[0], device=q.device).expand(qb.shape[0], -1)
            idx = new_idx if best_i is None else torch.cat([best_i, new_idx], 1)
            best_i = idx.gather(1, cols)
        out_s[q0:q0 + qb.shape[0]] = best_s
        out_i[q0:q0 + qb.shape[0]] = best_i
    return out_s.to(torch.float32), out_i
