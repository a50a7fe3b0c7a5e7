"""Cross-model (backward-compatibility) evaluation: self-test, cross-test, the empirical
compatibility criterion, update gain, and multi-generation compatibility matrices.

Notation: M(a, b) = a retrieval metric with queries embedded by model a and the gallery by
model b. BCT's empirical compatibility criterion (ECC): M(new, old) > M(old, old).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from bct_fast._core.arrays import dlpack_view, input_tensor
from bct_fast._core.io import atomic_write
from bct_fast._core.checks import check_matrix
from bct_fast.metrics import evaluate_retrieval

__all__ = ["CrossTestResult", "cross_test", "CompatibilityMatrix", "compatibility_matrix"]


@dataclass
class CrossTestResult:
    """Metrics for old/old, new/new and new/old (query model / gallery model)."""
    old_old: dict[str, float]
    new_new: dict[str, float]
    new_old: dict[str, float]
    metric: str  # the metric the verdict and the gain use

    @property
    def compatible(self) -> bool:
        """Empirical compatibility criterion: M(new, old) > M(old, old)."""
        return self.new_old[self.metric] > self.old_old[self.metric]

    @property
    def update_gain(self) -> float:
        """(M(new,old) - M(old,old)) / (M(new,new) - M(old,old)): the share of the full-upgrade
        improvement obtained without backfilling (nan when new/new does not improve)."""
        denom = self.new_new[self.metric] - self.old_old[self.metric]
        return (self.new_old[self.metric] - self.old_old[self.metric]) / denom if denom > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "compatible": self.compatible, "update_gain": self.update_gain}

    def matrix(self, old_name: str = "old", new_name: str = "new") -> "CompatibilityMatrix":
        """The 2 x 2 :class:`CompatibilityMatrix` of :attr:`metric` (new gallery with old
        queries not evaluated), e.g. for its heatmap."""
        m = self.metric
        return CompatibilityMatrix([old_name, new_name], [[self.old_old[m], None],
                                                          [self.new_old[m], self.new_new[m]]], m)

    def table(self, metrics: Sequence[str] = ("precision_at_1", "mean_average_precision")) -> str:
        """A printable table: one row per (query model / gallery model) pair."""
        head = f"{'query/gallery':<14}" + "".join(f"{m:>24}" for m in metrics)
        rows = [head]
        for name, vals in (("old/old", self.old_old), ("new/new", self.new_new), ("new/old", self.new_old)):
            rows.append(f"{name:<14}" + "".join(f"{100 * vals.get(m, float('nan')):>24.2f}" for m in metrics))
        rows.append(f"compatible (M(new,old) > M(old,old) on {self.metric}): {self.compatible}; "
                    f"update gain {self.update_gain:.3f}")
        return "\n".join(rows)


def cross_test(old_query: Tensor, new_query: Tensor, query_labels: Tensor, *,
               old_gallery: Tensor | None = None, new_gallery: Tensor | None = None,
               gallery_labels: Tensor | None = None, metric: str = "precision_at_1",
               k: int | str = "auto", query_map: Callable[[Tensor], Tensor] | None = None,
               gallery_map: Callable[[Tensor], Tensor] | None = None,
               **retrieval_kwargs) -> CrossTestResult:
    """Self-tests old/old and new/new and the cross-test new/old.

    Each model embeds the same query images (``old_query``, ``new_query``) and, if given, the
    same gallery images (``old_gallery``, ``new_gallery``). Without galleries the query set is
    its own gallery with leave-one-out: query i never retrieves image i, in any model pair. With
    galleries, ``exclude_self=True`` says that gallery row i is query i's image (in both models).

    The cross-test compares ``query_map(new_query)`` with ``gallery_map(old gallery)`` (identity
    when not given): how an upgrade meets the stored old embeddings, e.g. a slice or a learned
    projection of a wider new model (``InfluenceLoss.to_old_space``), or FCT's transformation of
    the old gallery (:mod:`bct_fast.transformation`). Without maps the new and old embeddings must
    have the same size (see :func:`bct_fast.losses.match_dim`); with them, the mapped ones must.
    ``retrieval_kwargs`` go to :func:`evaluate_retrieval`."""
    same = old_gallery is None and new_gallery is None
    if not same and (old_gallery is None or new_gallery is None or gallery_labels is None):
        raise ValueError("old_gallery, new_gallery, gallery_labels: give all three or none")
    # cupy / JAX / any DLPack producer: viewed, not copied (numpy galleries stay numpy: memmaps).
    old_query, new_query = dlpack_view(old_query, "old_query"), dlpack_view(new_query, "new_query")
    old_gallery, new_gallery = dlpack_view(old_gallery, "old_gallery"), dlpack_view(new_gallery, "new_gallery")
    for name, t in (("old_query", old_query), ("new_query", new_query), ("old_gallery", old_gallery),
                    ("new_gallery", new_gallery)):
        if not (t is None and "gallery" in name) and not isinstance(t, np.ndarray):  # memmaps: cosine_topk checks
            check_matrix(t, name)
    if "exclude_self" in retrieval_kwargs:
        exclude_self = retrieval_kwargs.pop("exclude_self")
        if same and exclude_self is False:
            raise ValueError("exclude_self: without galleries the query set is its own gallery and "
                             "each query's own image must be excluded")
    else:
        exclude_self = same
    if old_query.shape[0] != new_query.shape[0]:
        raise ValueError(f"new_query: {new_query.shape[0]} rows, but old_query has {old_query.shape[0]} "
                         "(both models must embed the same query images)")
    for name, f in (("query_map", query_map), ("gallery_map", gallery_map)):
        if f is not None and not callable(f):
            raise TypeError(f"{name}: expected a callable taking and returning an embedding matrix, got "
                            f"{type(f).__name__}")
    if query_map is None and gallery_map is None and old_query.shape[1] != new_query.shape[1]:
        raise ValueError(f"new_query: dim {new_query.shape[1]} != old dim {old_query.shape[1]}; "
                         "match them first (bct_fast.losses.match_dim) or pass query_map / gallery_map")
    og = old_query if same else old_gallery
    ng = new_query if same else new_gallery
    gl = query_labels if same else gallery_labels
    cross_q = new_query if query_map is None else query_map(new_query)
    cross_g = og if gallery_map is None else gallery_map(og)
    for name, t, rows in (("query_map", cross_q, new_query.shape[0]), ("gallery_map", cross_g, og.shape[0])):
        if not (hasattr(t, "shape") and len(t.shape) == 2 and t.shape[0] == rows):
            raise ValueError(f"{name}: must return a [{rows}, dim] matrix, got shape {getattr(t, 'shape', None)}")
    if cross_q.shape[1] != cross_g.shape[1]:
        raise ValueError(f"query_map, gallery_map: the mapped new queries have dim {cross_q.shape[1]} but the "
                         f"(mapped) old gallery has dim {cross_g.shape[1]}")
    if not same and exclude_self and (og.shape[0] < old_query.shape[0] or ng.shape[0] < new_query.shape[0]):
        raise ValueError("exclude_self: query i must be gallery row i in both galleries, but a gallery "
                         "has fewer rows than there are queries")
    kw = dict(k=k, exclude_self=bool(exclude_self), **retrieval_kwargs)
    result = CrossTestResult(
        old_old=evaluate_retrieval(old_query, query_labels, og, gl, **kw),
        new_new=evaluate_retrieval(new_query, query_labels, ng, gl, **kw),
        new_old=evaluate_retrieval(cross_q, query_labels, cross_g, gl, **kw),
        metric=metric)
    if metric not in result.old_old:
        raise ValueError(f"metric: {metric!r} was not computed (have {sorted(result.old_old)})")
    return result


@dataclass
class CompatibilityMatrix:
    """M[i][j] = metric with queries from model i and the gallery from model j (None if not
    evaluated). Models are ordered oldest first."""
    names: list[str]
    values: list[list[float | None]]
    metric: str
    extra: dict = field(default_factory=dict)

    @property
    def ac(self) -> float:
        """Average compatibility: fraction of pairs i > j with M(i, j) > M(j, j)."""
        pairs = [(i, j) for i in range(len(self.names)) for j in range(i)]
        if not pairs:
            return float("nan")
        return sum(self.values[i][j] > self.values[j][j] for i, j in pairs) / len(pairs)

    @property
    def am(self) -> float:
        """Average multi-model accuracy: mean of the lower triangle including the diagonal."""
        vals = [self.values[i][j] for i in range(len(self.names)) for j in range(i + 1)]
        return sum(vals) / len(vals)

    def table(self) -> str:
        w = max(15, *(len(n) + 2 for n in self.names))
        corner = "query/gallery"
        rows = [f"{corner:<{w}}" + "".join(f"{n:>{w}}" for n in self.names)]
        for name, row in zip(self.names, self.values):
            rows.append(f"{name:<{w}}" + "".join(f"{'-':>{w}}" if v is None else f"{100 * v:>{w}.2f}" for v in row))
        rows.append(f"{self.metric}: AC = {self.ac:.3f}, AM = {100 * self.am:.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {**asdict(self), "AC": self.ac, "AM": self.am}

    def save_json(self, path: str | Path) -> Path:
        data = json.dumps(self.to_dict(), indent=2).encode()
        return atomic_write(path, lambda f: f.write(data))

    def draw(self, ax, title: str | None = None):
        """Draw the heatmap on a matplotlib Axes (rows: query model, columns: gallery model);
        a pair i > j with M(i, j) <= M(j, j) is marked "(fails)". Returns the image."""
        import numpy as np

        n = len(self.names)
        grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in self.values])
        im = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        for i in range(n):
            for j in range(n):
                if not np.isnan(grid[i, j]):
                    ok = i <= j or grid[i, j] > grid[j, j]
                    ax.text(j, i, f"{grid[i, j]:.1f}" + ("" if ok else "\n(fails)"), ha="center",
                            va="center", color="white" if grid[i, j] < np.nanmean(grid) else "black", fontsize=9)
        ax.set_xticks(range(n), self.names, rotation=30, ha="right")
        ax.set_yticks(range(n), self.names)
        ax.set_xlabel("gallery model")
        ax.set_ylabel("query model")
        ax.set_title(title or f"{self.metric} (AC={self.ac:.2f}, AM={100 * self.am:.1f})", fontsize=10)
        return im

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Heatmap PNG (see :meth:`draw`), written atomically. Needs matplotlib."""
        plt = pyplot()
        n = len(self.names)
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * n, 1.2 + 1.0 * n), dpi=120)
        fig.colorbar(self.draw(ax, title), ax=ax, fraction=0.046)
        fig.tight_layout()
        return save_png(fig, path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plot: needs matplotlib (pip install matplotlib)") from e
    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    try:
        return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    finally:
        pyplot().close(fig)


def _viewed(embeddings: object, name: str) -> object:
    """The mapping with DLPack producers (cupy, ...) viewed as tensors, no copy."""
    if not isinstance(embeddings, Mapping):
        return embeddings  # _check_model_embeddings names the problem
    return {model: dlpack_view(emb, f"{name}[{model!r}]") for model, emb in embeddings.items()}


def _check_model_embeddings(embeddings: object, name: str, labels: object) -> None:
    """A non-empty {model name: [n, d] tensor or numpy array (memmap)} with one row per label."""
    if not isinstance(embeddings, Mapping):
        raise TypeError(f"{name}: expected a mapping {{model name: embeddings}}, got {type(embeddings).__name__}")
    if not embeddings:
        raise ValueError(f"{name}: needs at least one model")
    rows = labels.shape[0] if isinstance(labels, Tensor) else None
    for model, emb in embeddings.items():
        if not isinstance(emb, (Tensor, np.ndarray)) or emb.ndim != 2 or (rows is not None and emb.shape[0] != rows):
            got = tuple(emb.shape) if isinstance(emb, (Tensor, np.ndarray)) else type(emb).__name__
            raise ValueError(f"{name}[{model!r}]: expected a [{rows}, dim] tensor (one row per label), got {got}")


def compatibility_matrix(embeddings: Mapping[str, Tensor], labels: Tensor, *,
                         gallery_embeddings: Mapping[str, Tensor] | None = None,
                         gallery_labels: Tensor | None = None, metric: str = "precision_at_1",
                         lower_only: bool = False, k: int | str = "auto", **retrieval_kwargs) -> CompatibilityMatrix:
    """Evaluate every (query model, gallery model) pair over several model generations.

    ``embeddings`` maps model name -> its embeddings of the same query images, oldest model
    first (dict order). Without ``gallery_embeddings`` the query set is its own gallery
    (leave-one-out). ``lower_only`` skips pairs where the gallery model is newer than the query
    model (not needed for AC/AM)."""
    embeddings, labels = _viewed(embeddings, "embeddings"), input_tensor(labels, "labels")
    if gallery_embeddings is not None:
        gallery_embeddings = _viewed(gallery_embeddings, "gallery_embeddings")
        gallery_labels = input_tensor(gallery_labels, "gallery_labels")
    _check_model_embeddings(embeddings, "embeddings", labels)
    names = list(embeddings)
    same = gallery_embeddings is None
    if not same:
        if gallery_labels is None:
            raise ValueError("gallery_labels: required with gallery_embeddings")
        _check_model_embeddings(gallery_embeddings, "gallery_embeddings", gallery_labels)
        if list(gallery_embeddings) != names:
            raise ValueError("gallery_embeddings: must name the same models in the same order as embeddings")
    values: list[list[float | None]] = []
    for i, qn in enumerate(names):
        row = []
        for j, gn in enumerate(names):
            if lower_only and j > i:
                row.append(None)
                continue
            g = embeddings[gn] if same else gallery_embeddings[gn]
            m = evaluate_retrieval(embeddings[qn], labels, g, labels if same else gallery_labels,
                                   k=k, exclude_self=same, **retrieval_kwargs)
            if metric not in m:
                raise ValueError(f"metric: {metric!r} was not computed (have {sorted(m)})")
            row.append(m[metric])
        values.append(row)
    return CompatibilityMatrix(names, values, metric)
