"""Row norms shared by every op: the one definition of "normalized" (F.normalize's eps)."""
from __future__ import annotations

import torch


def inv_row_norms(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """1 / max(||row||, 1e-12) (the eps of F.normalize), accumulated in ``dtype`` (default: t's)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=dtype).clamp_min(1e-12).reciprocal()


def normalized_rows(t: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` scaled by ``inv_norm``, in inv_norm's dtype."""
    return t.to(inv_norm.dtype) * inv_norm[:, None]
