"""Retrieval and verification metrics computed from top-k search results (no Q x N matrix).

Names mean what they mean in torchmetrics / pytorch-metric-learning (cross-checked in tests):

- ``R`` (per query) = number of gallery items with the query's label, minus one when the
  query's own row is in the gallery (``exclude_self``). Queries with ``R = 0`` are "empty";
  ``empty_queries`` says what happens to them: ``"skip"`` (default; PML leaves such "lone"
  queries out), ``"zero"`` (they count 0 in every metric: torchmetrics' default
  ``empty_target_action="neg"``) or ``"error"``.
- ``precision_at_1``;
- ``hit_rate_at_K``: a relevant item among the first K (torchmetrics ``RetrievalHitRate``; the
  CMC at rank K; what many metric-learning papers call "Recall@K");
- ``recall_at_K``: the fraction of the query's R relevant items found in the first K
  (torchmetrics ``RetrievalRecall``);
- ``mean_average_precision``: the sum over the top-k of precision@i at each hit, divided by R
  (``ap_normalization="relevant"``: the full-ranking AP once k reaches every relevant item; PML)
  or by the hits within the top k (``"retrieved"``: torchmetrics ``RetrievalMAP(top_k=k)``);
- ``r_precision`` = hits in the first R / R; ``mean_average_precision_at_r`` = the AP sum over
  the first R, divided by R. Both need k >= max R ("auto" picks that k).
- Verification: ``tar_at_far`` (true accept rate at a false accept rate) from pair scores.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from bct_fast._core.arrays import dlpack_view, input_tensor
from bct_fast._core.checks import check_choice, check_int, check_labels, check_matrix
from bct_fast.ops import cosine_topk

__all__ = ["retrieval_metrics", "evaluate_retrieval", "cmc_curve", "relevant_counts",
           "tar_at_far", "pair_scores", "RETRIEVAL_METRICS"]

RETRIEVAL_METRICS = ("precision_at_1", "hit_rate_at_K", "recall_at_K", "mean_average_precision",
                     "r_precision", "mean_average_precision_at_r")
EMPTY_QUERIES = ("skip", "zero", "error")
AP_NORMALIZATIONS = ("relevant", "retrieved")


def _ranked_tensors(indices: object, query_labels: object, gallery_labels: object) -> tuple:
    """numpy arrays and DLPack producers (cupy, ...) as tensors (views where possible)."""
    return (input_tensor(indices, "indices"), input_tensor(query_labels, "query_labels"),
            input_tensor(gallery_labels, "gallery_labels"))


def _check_ranked(indices: object, query_labels: object, gallery_labels: object) -> None:
    """``indices`` [Q, k] rows of a gallery of ``len(gallery_labels)`` items, one row per query."""
    if not isinstance(indices, Tensor) or indices.dim() != 2:
        raise ValueError(f"indices: expected a 2-D integer tensor [queries, k], got "
                         f"{tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer tensor of gallery rows, got {indices.dtype}")
    check_labels(query_labels, "query_labels", indices.shape[0], None)
    check_labels(gallery_labels, "gallery_labels", None, None)
    n = gallery_labels.shape[0]
    if indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices))  # one reduction, one host sync
        if lo < 0 or hi >= n:
            raise ValueError(f"indices: gallery rows must be in [0, {n}) (len(gallery_labels)), got [{lo}, {hi}]")
        # A ranking lists each gallery item once; a repeated row would count its hit twice
        # (mAP above 1).
        srt = indices.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(1)
        if bool(dup.any()):
            q = int(dup.nonzero()[0, 0])
            raise ValueError(f"indices: row {q} lists a gallery item more than once (a ranking "
                             "repeats no item)")


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
    indices, query_labels, gallery_labels = _ranked_tensors(indices, query_labels, gallery_labels)
    _check_ranked(indices, query_labels, gallery_labels)
    R = relevant_counts(query_labels.to(indices.device), gallery_labels, exclude_self)
    hits = _hits(indices, query_labels, gallery_labels)[R > 0]
    return torch.cummax(hits.float(), dim=1).values.mean(0)


def retrieval_metrics(indices: Tensor, query_labels: Tensor, gallery_labels: Tensor, *,
                      exclude_self: bool = False, recall_at: Sequence[int] = (1, 5, 10),
                      include: Iterable[str] | None = None, empty_queries: str = "skip",
                      ap_normalization: str = "relevant") -> dict[str, float]:
    """Metrics from ranked gallery rows ``indices`` [Q, k] (see the module docstring).

    ``recall_at``: the ranks K of ``hit_rate_at_K`` and ``recall_at_K``. ``include`` names the
    metrics wanted (``RETRIEVAL_METRICS``); by default every metric that ``k`` allows. Asking for
    r_precision / mAP@R with k < max R raises ValueError (their value would be wrong), as does a
    rank K > k. With ``empty_queries="skip"`` and no query with a relevant item, every metric is
    NaN."""
    indices, query_labels, gallery_labels = _ranked_tensors(indices, query_labels, gallery_labels)
    _check_ranked(indices, query_labels, gallery_labels)
    recall_at = _check_recall_at(recall_at)
    check_choice(empty_queries, "empty_queries", EMPTY_QUERIES)
    check_choice(ap_normalization, "ap_normalization", AP_NORMALIZATIONS)
    k = indices.shape[1]
    ql = query_labels.to(indices.device)
    R = relevant_counts(ql, gallery_labels, exclude_self)
    keep = R > 0
    if empty_queries == "error" and not bool(keep.all()):
        rows = (~keep).nonzero()[:5, 0].tolist()
        raise ValueError(f"query_labels: queries {rows} have no relevant gallery item (empty_queries='error')")
    n_total = keep.numel() if empty_queries == "zero" else int(keep.sum())
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
    ranks_k = [r for r in recall_at if r <= k]
    if include is not None and wanted & {"hit_rate_at_K", "recall_at_K"} and len(ranks_k) < len(recall_at):
        raise ValueError(f"recall_at: {max(recall_at)} > k={k}")
    per_query: dict[str, Tensor] = {}  # metric -> values of the non-empty queries
    ranks = torch.arange(1, k + 1, device=hits.device, dtype=torch.float32)
    precision_at_hits = torch.cumsum(hits, 1) / ranks * hits
    if "precision_at_1" in wanted:
        per_query["precision_at_1"] = hits[:, 0]
    for r in ranks_k:
        if "hit_rate_at_K" in wanted:
            per_query[f"hit_rate_at_{r}"] = hits[:, :r].amax(1)
        if "recall_at_K" in wanted:
            per_query[f"recall_at_{r}"] = hits[:, :r].sum(1) / R
    if "mean_average_precision" in wanted:
        denom = R if ap_normalization == "relevant" else hits.sum(1).clamp_min(1)
        per_query["mean_average_precision"] = precision_at_hits.sum(1) / denom
    if wanted & {"r_precision", "mean_average_precision_at_r"}:
        within_r = ranks[None, :] <= R[:, None]
        if "r_precision" in wanted:
            per_query["r_precision"] = (hits * within_r).sum(1) / R
        if "mean_average_precision_at_r" in wanted:
            per_query["mean_average_precision_at_r"] = (precision_at_hits * within_r).sum(1) / R
    # empty queries count 0 ("zero"): the sum over the non-empty ones divided by all queries
    return {name: float(v.sum() / n_total) if n_total else float("nan") for name, v in per_query.items()}


def _real_tensor(x: object, name: str) -> Tensor:
    """A tensor of real numbers or booleans from a tensor, numpy array, DLPack producer or
    sequence; anything else is a TypeError naming ``name``."""
    x = dlpack_view(x, name)
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected a tensor or array of numbers, got {type(x).__name__}")
    try:
        t = torch.as_tensor(x)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a tensor or array of numbers, got {type(x).__name__} ({e})") from None
    if t.dtype.is_complex:
        raise TypeError(f"{name}: expected real numbers, got {t.dtype}")
    return t


def _check_recall_at(recall_at: Sequence[int]) -> tuple[int, ...]:
    if isinstance(recall_at, (str, bytes)) or not isinstance(recall_at, Iterable):
        raise TypeError(f"recall_at: expected a sequence of ranks K >= 1, got {recall_at!r}")
    return tuple(check_int(r, "recall_at", 1) for r in recall_at)


def _resolve_k(k, query_labels, gallery_labels, exclude_self: bool, n: int, recall_at) -> int:
    limit = n - 1 if exclude_self else n
    if k == "all":
        return limit
    if k == "auto":
        r_max = int(relevant_counts(query_labels, gallery_labels, exclude_self).max())
        return max(1, min(limit, max(r_max, max(recall_at, default=1))))
    if isinstance(k, str):
        raise ValueError(f"k: expected 'auto', 'all' or an integer, got {k!r}")
    return check_int(k, "k", 1, limit)


def evaluate_retrieval(query: Tensor, query_labels: Tensor, gallery: Tensor | None = None,
                       gallery_labels: Tensor | None = None, *, k: int | str = "auto",
                       exclude_self: bool | None = None, recall_at: Sequence[int] = (1, 5, 10),
                       include: Iterable[str] | None = None, chunk_size: int | None = None,
                       empty_queries: str = "skip", ap_normalization: str = "relevant",
                       progress: bool = False) -> dict[str, float]:
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
        recall_at, include, empty_queries, ap_normalization: see :func:`retrieval_metrics`.
        progress: a tqdm bar over gallery chunks (large galleries).
    """
    same = gallery is None
    if not same and gallery_labels is None:
        raise ValueError("gallery_labels: required when a gallery is given")
    # cupy / JAX / any DLPack producer: viewed, not copied; numpy labels as tensors.
    query, gallery = dlpack_view(query, "query"), dlpack_view(gallery, "gallery")
    query_labels = input_tensor(query_labels, "query_labels")
    gallery_labels = input_tensor(gallery_labels, "gallery_labels")
    gallery = query if same else gallery
    gallery_labels = query_labels if same else gallery_labels
    exclude_self = same if exclude_self is None else exclude_self
    for name, t in (("query", query), ("gallery", gallery)):
        if not isinstance(t, np.ndarray):  # numpy arrays / memmaps are checked by cosine_topk
            check_matrix(t, "query" if same else name)
    recall_at = _check_recall_at(recall_at)
    if exclude_self and gallery.shape[0] < 2:
        raise ValueError(f"{'query' if same else 'gallery'}: leave-one-out retrieval needs at least 2 rows")
    for name, lab, rows in (("query_labels", query_labels, query.shape[0]),
                            ("gallery_labels", gallery_labels, gallery.shape[0])):
        check_labels(lab, name, rows, None)
    kk = _resolve_k(k, query_labels.cpu(), gallery_labels.cpu(), exclude_self, gallery.shape[0], recall_at)
    _, idx = cosine_topk(query, gallery, kk, exclude_self=exclude_self, chunk_size=chunk_size, progress=progress)
    return retrieval_metrics(idx, query_labels, gallery_labels, exclude_self=exclude_self,
                             recall_at=recall_at, include=include, empty_queries=empty_queries,
                             ap_normalization=ap_normalization)


def pair_scores(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of row i of ``a`` with row i of ``b`` (verification pairs; ``a`` may
    come from the new model and ``b`` from the old one for a cross-model test)."""
    a, b = dlpack_view(a, "a"), dlpack_view(b, "b")
    check_matrix(a, "a")
    check_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b: expected the same [pairs, dim] shape as a {tuple(a.shape)}, got {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


def tar_at_far(scores: Tensor, is_same: Tensor, fars: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> dict[str, float]:
    """True accept rate at each false accept rate, for verification pairs.

    A pair is accepted when its score is strictly above the threshold; for each target FAR the
    threshold is the lowest one that accepts at most ``floor(far * impostors)`` impostor pairs,
    i.e. the best TAR on the ROC curve with FAR <= target. Keys: ``tar_at_far_1e-03`` etc."""
    scores = _real_tensor(scores, "scores").double().flatten()
    is_same = _real_tensor(is_same, "is_same")
    if is_same.dtype.is_floating_point and not bool(((is_same == 0) | (is_same == 1)).all()):
        raise ValueError("is_same: expected booleans (or 0/1), got other values")
    is_same = is_same.bool().flatten().to(scores.device)  # flags may live on another device
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
