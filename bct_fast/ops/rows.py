"""Row helpers shared by every op: the one definition of "normalized", and one masked column per row.

``F.normalize`` squares in the input's precision, so a finite fp32 row scaled by 1e20 has an
infinite norm (the row becomes 0) and a row of norm below ~1e-19 underflows (and below 1e-12 it
is only scaled by F.normalize's eps, not normalized). Cosine is scale-free, so here every row
with a nonzero norm is normalized exactly: the fast norm is computed as usual and the rare rows
whose norm overflowed, underflowed or is tiny are recomputed scaled by their largest entry, in
float64. All-zero rows keep the ``F.normalize`` convention: they stay 0 (cosine 0 with anything).
"""
from __future__ import annotations

import torch

_TINY = 1e-12  # below this the fast norm may have lost its squares to underflow
_NORM_FLOOR = torch.finfo(torch.float32).tiny  # inverse norms stay finite in fp32


def _unreliable(n: torch.Tensor) -> torch.Tensor:
    """Norms the fast path may have got wrong: overflowed squares, underflowed or tiny rows."""
    return ~torch.isfinite(n) | (n < _TINY)


def _scaled_norms(t: torch.Tensor) -> torch.Tensor:
    """Norms in float64 of rows divided by their largest |entry| first (no over/underflow)."""
    sub = t.to(torch.float64)
    big = sub.abs().amax(1)
    safe = torch.where((big > 0) & torch.isfinite(big), big, torch.ones_like(big))
    exact = torch.linalg.vector_norm(sub / safe[:, None], dim=1) * safe
    return torch.where(torch.isfinite(big), exact, big)  # an inf entry: the norm is inf


def row_norms(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """||row|| per row, in ``dtype`` (default t's), exact to rounding for any finite row (no
    overflow or underflow of the squares); NaN rows give NaN, inf rows inf."""
    out_dtype = dtype or t.dtype
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph
        return _scaled_norms(t).to(out_dtype)
    n = torch.linalg.vector_norm(t, dim=1, dtype=dtype)
    # One comparison for the common case (a NaN fails it too): every norm in [_TINY, max].
    if torch.equal(n, n.clamp(_TINY, torch.finfo(n.dtype).max)):
        return n
    # Rare: huge, tiny, zero or non-finite rows (the comparison above failed, so there are some).
    rows = _unreliable(n).nonzero()[:, 0]
    n = n.clone()
    n[rows] = _scaled_norms(t[rows]).to(n.dtype)
    return n


def inv_row_norms(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """1 / ||row|| accumulated in ``dtype`` (default: t's). Zero rows get a finite value (the
    row stays 0 when scaled); norms below fp32's smallest normal number are floored there."""
    return row_norms(t, dtype).clamp_min(_NORM_FLOOR).reciprocal()


def inv_row_norms_stepped(t: torch.Tensor, dtype: torch.dtype = torch.float32, step: int = 1 << 20) -> torch.Tensor:
    """:func:`inv_row_norms` of every row, ``step`` rows at a time: a gallery's norms up front,
    without an upcast copy of all of it (20 GiB at 10M x 512 bf16) and with one host check per
    step instead of one per search chunk."""
    return torch.cat([inv_row_norms(t[i:i + step], dtype) for i in range(0, t.shape[0], step)])


def normalized_rows(t: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` scaled by ``inv_norm``, in inv_norm's dtype."""
    return t.to(inv_norm.dtype) * inv_norm[:, None]


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """Unit rows (zero rows stay 0): ``F.normalize(t, dim=1)`` without its overflow, underflow
    and eps limits. Differentiable (autograd through the norm)."""
    if t.requires_grad and torch.is_grad_enabled():
        n = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        if bool(_unreliable(n).any()):  # rare: rescale by a detached max first
            s = t.detach().abs().amax(1, keepdim=True)
            t = t / torch.where(s > 0, s, torch.ones_like(s))
            n = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        return t / n.clamp_min(_NORM_FLOOR)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return normalized_rows(t, inv_row_norms(t, acc)).to(t.dtype)


def mask_one_column(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``t`` [R, cols] with ``t[i, local[i]] = -inf`` for the rows whose ``local[i]`` lies in
    [0, cols) (a loss row's target class, a search query's own gallery row); in place, in fixed
    shapes: no ``nonzero``, so no host sync on a GPU. Returns ``t``."""
    col = local.clamp(0, t.shape[1] - 1)
    inside = (col == local)[:, None]  # local in [0, cols): the clamp left it alone
    col = col[:, None]
    return t.scatter_(1, col, t.gather(1, col).masked_fill_(inside, float("-inf")))
