"""Plain float64 references: materialize everything, differentiate with autograd.

These are the oracles of the test-suite. They share no code with the fused / chunked paths
beyond the margin definitions' *formulas*, which they restate with autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bct_fast.ops.margins import MarginValue, make_margin


def margin_target_ref(cos_t: torch.Tensor, margin_type: str, margin: MarginValue, straight_through: bool) -> torch.Tensor:
    """f(cos) per bct_fast.ops.margins, with autograd giving its derivative."""
    mg = make_margin(margin_type, margin)
    c = cos_t.clamp(-1.0, 1.0)
    if mg.is_cosine_only:
        f = c - mg.m3
    else:
        theta = torch.acos(c)
        phi = mg.m1 * theta + mg.m2
        f = torch.where(phi <= math.pi, torch.cos(phi) - mg.m3, c - mg.m3 - mg.m2 * math.sin(mg.m2))
    if straight_through:
        return cos_t + (f - cos_t).detach()
    return f


def cosine_margin_cross_entropy_ref(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 64.0,
    margin_type: str = "none",
    margin: MarginValue = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    arcface_grad: str = "exact",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Normalized-softmax margin cross-entropy with the full B x C logit matrix, in float64 (or in
    ``compute_dtype``: the naive same-precision PyTorch computation that tests measure the
    fused op's rounding error against)."""
    x = F.normalize(embeddings.to(compute_dtype), dim=1)
    w = F.normalize(weight.to(compute_dtype), dim=1)
    cos = x @ w.T
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    cos_t = cos.gather(1, safe[:, None])[:, 0]
    f = margin_target_ref(cos_t, margin_type, margin, arcface_grad == "straight_through")
    logits = (scale * cos).scatter(1, safe[:, None], (scale * f)[:, None])
    target = torch.where(valid, labels, torch.full_like(labels, -100))
    if reduction == "mean" and not bool(valid.any()):
        return logits.sum() * 0.0  # all rows ignored: bct_fast returns 0 (torch would give nan)
    return F.cross_entropy(logits, target, ignore_index=-100, reduction=reduction,
                           label_smoothing=label_smoothing)
