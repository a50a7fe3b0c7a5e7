"""Exact top-k cosine search for users: ``cosine_topk``, galleries as files, PML's ``knn_func``.

``cosine_topk`` is the op (:mod:`bct_fast.ops.topk`): exact, bounded memory, ties to the lower
gallery index, CUDA kernel or chunked PyTorch picked per call. ``GalleryIndex``
(:mod:`bct_fast.gallery`) stores embeddings with ids, labels and the model version in a
checksummed file. ``KnnFunc`` plugs the search into pytorch-metric-learning.
"""
from __future__ import annotations

from torch import Tensor

from bct_fast.gallery import GalleryIndex, IndexFileError
from bct_fast.ops import cosine_topk

__all__ = ["cosine_topk", "KnnFunc", "GalleryIndex", "IndexFileError"]


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
