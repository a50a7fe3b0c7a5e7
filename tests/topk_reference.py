"""Float64 top-k oracle shared by the search tests, and a guard against near-ties in random data."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def reference_scores(q, g, exclude_self=False, normalize=True):
    """float64 cosine (or, without normalize, inner-product) matrix [Q, N]; with exclude_self,
    query i's own gallery row i at -inf."""
    if normalize:
        s = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(g.double(), dim=1).T
    else:
        s = q.double() @ g.double().T
    if exclude_self:
        s.fill_diagonal_(-float("inf"))
    return s


def _first_k(s, k):
    """Top k of each row of a float64 score matrix, ordered by (score desc, index asc)."""
    idx = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s.numpy()), axis=1)[:, :k]
    return s.gather(1, torch.from_numpy(idx)), torch.from_numpy(idx)


def reference_topk(q, g, k, exclude_self=False):
    """float64 full score matrix; order by (score desc, index asc)."""
    return _first_k(reference_scores(q, g, exclude_self), k)


def assert_topk_matches_reference(s, i, q, g, k, atol=1e-6, exclude_self=False, normalize=True):
    """The returned lists are an exact top-k up to fp32 noise.

    Random float inputs make near-ties (two float64 scores ~1e-8 apart) that fp32 rounding may
    order either way, so index equality is demanded only where the reference order is decided
    by more than `atol`: each returned index must be distinct and carry, in float64, the
    reference score of its rank. A wrong neighbour, a missing one or a duplicate fails.
    """
    s, i = s.cpu(), i.cpu()
    full = reference_scores(q, g, exclude_self, normalize)
    rs, ri = _first_k(full, k)
    assert s.shape == i.shape == rs.shape
    assert torch.allclose(s.double(), rs, atol=atol), "scores differ from the float64 top-k"
    exact_of_returned = full.gather(1, i)
    assert torch.allclose(exact_of_returned, rs, atol=atol), "a returned index does not hold its rank's score"
    assert all(len(set(row)) == k for row in i.tolist()), "an index is returned twice"
    # ranks whose place is decided by more than atol from both neighbours (rank k+1 included)
    ordered = full.sort(dim=1, descending=True).values.nan_to_num(neginf=-1e300)
    gap = ordered[:, :-1] - ordered[:, 1:]
    decided = torch.ones_like(ordered, dtype=torch.bool)
    decided[:, :-1] &= gap > atol
    decided[:, 1:] &= gap > atol
    decided = decided[:, :k]
    assert torch.equal(i[decided], ri[decided]), "a clearly ordered neighbour is misplaced"


def near_tie_free(make: Callable[[], tuple[torch.Tensor, torch.Tensor]], k: int, n_queries: int | None = None,
                  gap: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(queries, gallery) = make()`` until the float64 cosine scores of the first
    ``n_queries`` queries are more than ``gap`` apart over their top k+1 places.

    For tests that compare rankings computed two ways (ours vs a peer): random floats make
    neighbours ~1e-8 apart, which fp32 may order either way; such draws are redrawn."""
    for _ in range(1000):
        q, g = make()
        top = reference_scores(q[:n_queries], g).topk(min(k + 2, g.shape[0]), dim=1).values
        if (top[:, :-1] - top[:, 1:]).min() > gap:
            return q, g
    raise RuntimeError("near_tie_free: no draw without near-ties in 1000 tries; lower k or gap")


def assert_matches_cupy(s, i, q, g, k, atol):
    """cupy's own float64 matmul and argsort of the normalized rows (an independent GPU
    reference): the returned scores equal cupy's top-k scores within ``atol``, and every returned
    index is a true top-k member up to near-ties of ``atol``. Skips where cupy does not import."""
    import pytest

    cp = pytest.importorskip("cupy")
    qc = cp.asarray(q.float().cpu().numpy().astype(np.float64))
    gc = cp.asarray(g.float().cpu().numpy().astype(np.float64))
    qc /= cp.linalg.norm(qc, axis=1, keepdims=True)
    gc /= cp.linalg.norm(gc, axis=1, keepdims=True)
    ref = qc @ gc.T
    order = cp.argsort(-ref, axis=1)[:, :k]
    ref_s = cp.take_along_axis(ref, order, 1).get()
    assert np.abs(s.cpu().numpy() - ref_s).max() < atol
    got_true = cp.take_along_axis(ref, cp.asarray(i.cpu().numpy()), 1).get()
    assert (got_true >= ref_s[:, -1:] - atol).all()
