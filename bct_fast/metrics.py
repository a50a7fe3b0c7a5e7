"""Retrieval metrics computed from top-k search results (no Q x N matrix).

Names follow pytorch-metric-learning's AccuracyCalculator where they coincide.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bct_fast.search import cosine_topk

__all__ = ["retrieval_metrics", "evaluate_retrieval"]


def retrieval_metrics(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor, *,
                      exclude_self: bool = False, recall_at: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """precision_at_1, recall_at_K (= CMC top-K hit rate) and mean_average_precision.

    ``indices`` [Q, k] are ranked gallery rows. mAP divides by the number of relevant gallery
    items (minus the query itself with ``exclude_self``); it is exact when k covers every
    relevant item (k = N always does) and a lower bound otherwise. Queries with no relevant
    gallery item are left out of mAP, as in PML."""
    query_labels, gallery_labels = query_labels.to(indices.device), gallery_labels.to(indices.device)
    hits = (gallery_labels[indices] == query_labels[:, None]).float()  # [Q, k]
    k = indices.shape[1]
    out = {"precision_at_1": float(hits[:, 0].mean())}
    for r in recall_at:
        if r <= k:
            out[f"recall_at_{r}"] = float(hits[:, :r].amax(1).mean())
    counts = torch.bincount(gallery_labels, minlength=int(max(gallery_labels.max(), query_labels.max())) + 1)
    relevant = counts[query_labels].float() - (1.0 if exclude_self else 0.0)
    ranks = torch.arange(1, k + 1, device=indices.device, dtype=torch.float32)
    precision_at_hits = torch.cumsum(hits, 1) / ranks * hits
    has_relevant = relevant > 0
    ap = precision_at_hits.sum(1)[has_relevant] / relevant[has_relevant]
    out["mean_average_precision"] = float(ap.mean()) if ap.numel() else float("nan")
    return out


def evaluate_retrieval(query: Tensor, query_labels: Tensor, gallery: Tensor | None = None,
                       gallery_labels: Tensor | None = None, *, k: int | None = None,
                       exclude_self: bool | None = None) -> dict[str, float]:
    """Search ``query`` against ``gallery`` and return :func:`retrieval_metrics`.

    With ``gallery=None`` the query set is its own gallery. ``exclude_self`` (default: True
    exactly when gallery is None) drops row i of the gallery for query i: leave-one-out, also
    for a cross-model test where gallery row i is the OLD model's embedding of query i's image.
    k defaults to the whole gallery (exact mAP)."""
    same = gallery is None
    if not same and gallery_labels is None:
        raise ValueError("gallery_labels: required when a gallery is given")
    gallery = query if same else gallery
    gallery_labels = query_labels if same else gallery_labels
    exclude_self = same if exclude_self is None else exclude_self
    k = k or (gallery.shape[0] - 1 if exclude_self else gallery.shape[0])
    _, idx = cosine_topk(query, gallery, k, exclude_self=exclude_self)
    return retrieval_metrics(idx, query_labels, gallery_labels, exclude_self=exclude_self)
