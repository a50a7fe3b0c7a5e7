"""Retrieval and verification metrics computed from top-k search results (no Q x N matrix).

Names and conventions follow pytorch-metric-learning's ``AccuracyCalculator`` where they
coincide:

- ``R`` (per query) = number of gallery items with the query's label, minus one when the
  query's own row is in the gallery (``exclude_self``). Queries with ``R = 0`` ("lone" queries)
  are left out of every retrieval metric, as in PML.
- ``precision_at_1``; ``recall_at_K`` = CMC at rank K (a relevant item among the first K);
- ``mean_average_precision``: sum over the top-k of precision@i at each hit, divided by R.
  Exact full-ranking mAP when k reaches every relevant item (k = "all" always does);
- ``r_precision`` = hits in the first R / R; ``mean_average_precision_at_r`` = the AP sum over
  the first R, divided by R. Both need k >= max R ("auto" picks that k).
- Verification: ``tar_at_far`` (true accept rate at a false accept rate) from pair scores.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

from bct_fast._core.checks import check_labels
from bct_fast.ops import cosine_topk

__all__ = ["retrieval_metrics", "evaluate_retrieval", "cmc_curve", "relevant_counts",
           "tar_at_far", "pair_scores", "RETRIEVAL_METRICS"]

RETRIEVAL_METRICS = ("precision_at_1", "recall_at_K", "mean_average_precision", "r_precision",
                     "mean_average_precision_at_r")


def _check_ranked(indices: object, query_labels: object, gallery_labels: object) -> None:
    """``indices`` [Q, k] rows of a gallery of ``len(gallery_labels)`` items, one row per query."""
    if not isinstance(indices, Tensor) or indices.dim() != 2 or indices.dtype.is_floating_point:
        raise ValueError(f"indices: expected a 2-D integer tensor [queries, k], got "
                         f"{tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__}")
    check_labels(query_labels, "query_labels", indices.shape[0], None)
    check_labels(gallery_labels, "gallery_labels", None, None)
    n = gallery_labels.shape[0]
    if indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices))  # one reduction, one host sync
        if lo < 0 or hi >= n:
            raise ValueError(f"indices: gallery rows must be in [0, {n}) (len(gallery_labels)), got [{lo}, {hi}]")


def relevant_counts(query_labels: Tensor, gallery_labels: Tensor, exclude_self: bool = False) -> Tensor:
    """R per query: gallery items sharing its label (its own row excluded with ``exclude_self``)."""
    gallery_labels = gallery_labels.to(query_labels.device)
    uniq, counts = torch.unique(gallery_labels, return_counts=True)
    pos = torch.searchsorted(uniq, query_labels).clamp_max(uniq.numel() - 1)
    R = torch.where(uniq[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))
    return R - int(exclude_self)


def _hits(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    return gallery_labels.to(indices.device)[indices] == query_labels.to(indices.device)[:, None]


def cmc_curve(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor, *,
              exclude_self: bool = False) -> Tensor:
    """[k] fraction of (non-lone) queries with a relevant item within the first r ranks."""
    _check_ranked(indices, query_labels, gallery_labels)
    R = relevant_counts(query_labels.to(indices.device), gallery_labels, exclude_self)
    hits = _hits(indices, query_labels, gallery_labels)[R > 0]
    return torch.cummax(hits.float(), dim=1).values.mean(0)


def retrieval_metrics(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor, *,
                      exclude_self: bool = False, recall_at: Sequence[int] = (1, 5, 10),
                      include: Iterable[str] | None = None) -> dict[str, float]:
    """Metrics from ranked gallery rows ``indices`` [Q, k] (see the module docstring).

    ``include`` names the metrics wanted (``RETRIEVAL_METRICS``); by default every metric that
    ``k`` allows. Asking for r_precision / mAP@R with k < max R raises ValueError (their value
    would be wrong), as does a recall_at_K with K > k."""
    _check_ranked(indices, query_labels, gallery_labels)
    k = indices.shape[1]
    ql = query_labels.to(indices.device)
    R = relevant_counts(ql, gallery_labels, exclude_self)
    keep = R > 0
    hits = _hits(indices, ql, gallery_labels)[keep].float()
    R = R[keep].float()
    r_max = int(R.max()) if R.numel() else 0
    wanted = set(RETRIEVAL_METRICS if include is None else include)
    unknown = wanted - set(RETRIEVAL_METRICS)
    if unknown:
        raise ValueError(f"include: unknown metrics {sorted(unknown)} (choose from {RETRIEVAL_METRICS})")
    if include is None and k < r_max:
        wanted -= {"r_precision", "mean_average_precision_at_r"}
    elif k < r_max and wanted & {"r_precision", "mean_average_precision_at_r"}:
        raise ValueError(f"indices: k={k} < max R={r_max}; r_precision and mAP@R need k >= the "
                         "largest number of relevant gallery items (search with k='auto')")
    out: dict[str, float] = {}
    nan = float("nan")
    if hits.shape[0] == 0:
        return {name: nan for name in wanted if name != "recall_at_K"}
    ranks = torch.arange(1, k + 1, device=hits.device, dtype=torch.float32)
    precision_at_hits = torch.cumsum(hits, 1) / ranks * hits
    if "precision_at_1" in wanted:
        out["precision_at_1"] = float(hits[:, 0].mean())
    if "recall_at_K" in wanted:
        for r in recall_at:
            if r > k:
                if include is not None:
                    raise ValueError(f"recall_at: {r} > k={k}")
                continue
            out[f"recall_at_{r}"] = float(hits[:, :r].amax(1).mean())
    if "mean_average_precision" in wanted:
        out["mean_average_precision"] = float((precision_at_hits.sum(1) / R).mean())
    if wanted & {"r_precision", "mean_average_precision_at_r"}:
        within_r = ranks[None, :] <= R[:, None]
        if "r_precision" in wanted:
            out["r_precision"] = float(((hits * within_r).sum(1) / R).mean())
        if "mean_average_precision_at_r" in wanted:
            out["mean_average_precision_at_r"] = float(((precision_at_hits * within_r).sum(1) / R).mean())
    return out


def _resolve_k(k, query_labels, gallery_labels, exclude_self: bool, n: int, recall_at) -> int:
    limit = n - 1 if exclude_self else n
    if k == "all":
        return limit
    if k == "auto":
        r_max = int(relevant_counts(query_labels, gallery_labels, exclude_self).max())
        return max(1, min(limit, max(r_max, max(recall_at, default=1))))
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    raise ValueError(f"k: expected 'auto', 'all' or an integer, got {k!r}")


def evaluate_retrieval(query: Tensor, query_labels: Tensor, gallery: Tensor | None = None,
                       gallery_labels: Tensor | None = None, *, k: int | str = "auto",
                       exclude_self: bool | None = None, recall_at: Sequence[int] = (1, 5, 10),
                       include: Iterable[str] | None = None, chunk_size: int | None = None) -> dict[str, float]:
    """Search ``query`` against ``gallery`` and return :func:`retrieval_metrics`.

    Args:
        gallery: None = the query set is its own gallery (leave-one-out).
        gallery_labels: required with a gallery.
        k: neighbours retrieved. "auto" (default) = max(largest R, recall ranks): exact
            r_precision / mAP@R / recall in memory O(Q * k); "all" = the whole gallery (exact
            full-ranking mAP; O(Q * N) memory); or an integer.
        exclude_self: drop gallery row i for query i (default: exactly when gallery is None).
            Also right for a cross-model test in which gallery row i is the OLD model's
            embedding of query i's image.
    """
    same = gallery is None
    if not same and gallery_labels is None:
        raise ValueError("gallery_labels: required when a gallery is given")
    gallery = query if same else gallery
    gallery_labels = query_labels if same else gallery_labels
    exclude_self = same if exclude_self is None else exclude_self
    for name, lab, rows in (("query_labels", query_labels, query.shape[0]),
                            ("gallery_labels", gallery_labels, gallery.shape[0])):
        check_labels(lab, name, rows, None)
    kk = _resolve_k(k, query_labels.cpu(), gallery_labels.cpu(), exclude_self, gallery.shape[0], recall_at)
    _, idx = cosine_topk(query, gallery, kk, exclude_self=exclude_self, chunk_size=chunk_size)
    return retrieval_metrics(idx, query_labels, gallery_labels, exclude_self=exclude_self,
                             recall_at=recall_at, include=include)


def pair_scores(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of row i of ``a`` with row i of ``b`` (verification pairs; ``a`` may
    come from the new model and ``b`` from the old one for a cross-model test)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"b: expected the same [pairs, dim] shape as a {tuple(a.shape)}, got {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


def tar_at_far(scores: Tensor, is_same: Tensor, fars: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> dict[str, float]:
    """True accept rate at each false accept rate, for verification pairs.

    A pair is accepted when its score is strictly above the threshold; for each target FAR the
    threshold is the lowest one that accepts at most ``floor(far * impostors)`` impostor pairs,
    i.e. the best TAR on the ROC curve with FAR <= target. Keys: ``tar_at_far_1e-03`` etc."""
    scores = torch.as_tensor(scores).double().flatten()
    is_same = torch.as_tensor(is_same).bool().flatten()
    if scores.shape != is_same.shape:
        raise ValueError(f"is_same: expected {scores.numel()} flags, got {is_same.numel()}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contains NaN or inf")
    gen, imp = scores[is_same], scores[~is_same]
    if gen.numel() == 0 or imp.numel() == 0:
        raise ValueError("is_same: needs both genuine (True) and impostor (False) pairs")
    imp_desc = torch.sort(imp, descending=True).values
    out = {}
    for far in fars:
        if not 0 < far <= 1:
            raise ValueError(f"fars: each must be in (0, 1], got {far}")
        allowed = math.floor(far * imp.numel() + 1e-9)
        thr = imp_desc[allowed] if allowed < imp.numel() else -math.inf
        out[f"tar_at_far_{far:.0e}"] = float((gen > thr).double().mean())
    return out
