"""Exact top-k cosine search for users: ``cosine_topk``, galleries as files, PML's ``knn_func``.

``cosine_topk`` is the op (:mod:`bct_fast.ops.topk`): exact, bounded memory, ties to the lower
gallery index, CUDA kernel or chunked PyTorch picked per call. ``GalleryIndex``
(:mod:`bct_fast.gallery`) stores embeddings with ids, labels and the model version in a
checksummed file. ``KnnFunc`` plugs the search into pytorch-metric-learning; ``FlatIndex``
gives faiss users ``IndexFlatIP``'s calling conventions (numpy in, ``(D, I)`` out, -1 padding).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bct_fast._core.arrays import dlpack_view, host_tensor
from bct_fast._core.checks import check_choice, check_fits, check_int
from bct_fast.gallery import GalleryIndex, IndexFileError
from bct_fast.ops import cosine_topk

__all__ = ["cosine_topk", "KnnFunc", "GalleryIndex", "IndexFileError", "FlatIndex"]

_FAISS_PAD_SCORE = -np.finfo(np.float32).max  # what faiss's IndexFlatIP writes in unfilled places


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


class FlatIndex:
    """A faiss-style exact index: ``index.add(xb); D, I = index.search(xq, k)``.

    Follows faiss's ``IndexFlatIP`` conventions where a faiss user relies on them: numpy in gives
    numpy out (``D`` float32 [n, k], ``I`` int64 [n, k]; torch in gives torch out); ``k`` above
    ``ntotal`` pads each row with score ``-FLT_MAX`` and index ``-1``; an empty query batch gives
    empty [0, k] results; ``ntotal``, ``d``, ``is_trained``, ``reset()``.

    Deliberate differences (stated, tested): equal scores are ordered by ascending row (faiss
    leaves the order of ties unspecified, and its flat index returns duplicates highest row
    first); a NaN/inf query or row is a ValueError (faiss silently returns -1 rows);
    ``metric="cosine"`` normalizes both sides (faiss needs a normalized copy). The search is
    :func:`cosine_topk`: exact, bounded memory, CUDA when the rows are CUDA tensors.
    """

    def __init__(self, d: int, metric: str = "ip") -> None:
        self.d = check_int(d, "d", 1)
        check_choice(metric, "metric", ("ip", "cosine"))
        self.metric = metric
        self.is_trained = True
        self._parts: list[Tensor] = []
        self._rows: Tensor | None = None

    @property
    def ntotal(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    def reset(self) -> None:
        """Remove every row."""
        self._parts, self._rows = [], None

    def _as_tensor(self, x, name: str) -> Tensor:
        x = dlpack_view(x, name)  # cupy, JAX, ...: viewed, not copied
        if isinstance(x, np.ndarray):
            if x.dtype.kind != "f":
                raise TypeError(f"{name}: expected a float array, got {x.dtype}")
            x = host_tensor(x)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{name}: expected shape [n, {self.d}], got {shape}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float array, got {x.dtype}")
        return x

    def add(self, x) -> None:
        """Append rows [n, d] (numpy or torch); their ids are ntotal, ntotal + 1, ... The rows live
        on the device of the first ones added (later ones are copied there)."""
        x = self._as_tensor(x, "x")
        if x.shape[0]:
            if not bool(torch.isfinite(x).all()):
                raise ValueError("x: contains NaN or inf")
            device = self._parts[0].device if self._parts else x.device
            self._parts.append(x.detach().to(device, copy=True))
            self._rows = None

    def search(self, x, k: int):
        """``(D, I)``: the k best rows per query, best first; see the class docstring."""
        numpy_out = isinstance(x, np.ndarray)
        q = self._as_tensor(x, "x")
        k = check_int(k, "k", 1)
        n, total = q.shape[0], self.ntotal
        # faiss pads k beyond ntotal: the [n, k] results exist whatever k is (12 bytes each).
        check_fits(12 * n * k, "k", f"the [{n}, {k}] results", q.device)
        D = torch.full((n, k), float(_FAISS_PAD_SCORE), dtype=torch.float32, device=q.device)
        I = torch.full((n, k), -1, dtype=torch.int64, device=q.device)
        if n and total:
            if self._rows is None:
                self._rows = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            # Rows on a GPU search there (host queries are copied over, results come back); host
            # rows with CUDA queries are streamed to the GPU chunk by chunk by cosine_topk,
            # never copied whole.
            on_rows = q.to(self._rows.device) if self._rows.is_cuda and not q.is_cuda else q
            kk = min(k, total)
            s, i = cosine_topk(on_rows, self._rows, kk, normalize=self.metric == "cosine")
            D[:, :kk], I[:, :kk] = s.to(D.device), i.to(I.device)
        return (D.cpu().numpy(), I.cpu().numpy()) if numpy_out else (D, I)

