"""Margin definitions of the normalized-softmax loss family.

Every margin acts only on the target logit. With theta the angle between the normalized
embedding and its class row, cos theta = c:

- ``none``     (NormFace):  f(c) = c
- ``cosface``  (additive cosine margin m):  f(c) = c - m
- ``arcface``  (additive angular margin m, radians):  f(c) = cos(theta + m), and the classic
  monotonic fallback f(c) = c - m sin(m) once theta + m > pi (insightface's older ``th``/``mm``).
- ``combined`` (insightface CombinedMarginLoss, m = (m1, m2, m3)):
  f(c) = cos(m1 theta + m2) - m3, with fallback f(c) = c - m3 - m2 sin(m2) once m1 theta + m2 > pi.
  (1, 0, m) is CosFace and (1, m, 0) is ArcFace.

The target logit is ``scale * f(c)``; the other logits are ``scale * c``.

Gradient of the margin: ``"exact"`` differentiates f (the angular derivative
m1 sin(m1 theta + m2) / sin(theta), with sin(theta) floored at 1e-6 so c = +-1 stays finite);
``"straight_through"`` uses df/dc = 1 like insightface's arcface_torch, which applies the margin
under ``torch.no_grad()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

MarginType = Literal["none", "cosface", "arcface", "combined"]
MarginValue = Union[float, Sequence[float]]

SIN_FLOOR = 1e-6


@dataclass(frozen=True)
class Margin:
    """Combined margin (m1, m2, m3): f(c) = cos(m1 * theta + m2) - m3."""

    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0

    @property
    def is_cosine_only(self) -> bool:
        """True when f is affine in c (NormFace / CosFace): no arccos needed."""
        return self.m1 == 1.0 and self.m2 == 0.0


def make_margin(margin_type: str, margin: MarginValue) -> Margin:
    """Validate ``margin_type`` / ``margin`` and return the equivalent combined margin."""
    if margin_type == "combined":
        if isinstance(margin, (int, float)) or len(margin) != 3:
            raise ValueError("margin: margin_type='combined' takes a tuple (m1, m2, m3)")
        m1, m2, m3 = (float(v) for v in margin)
        if not all(math.isfinite(v) for v in (m1, m2, m3)) or m1 <= 0:
            raise ValueError(f"margin: combined margin needs finite values and m1 > 0, got {margin}")
        return Margin(m1, m2, m3)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin: expected a finite float for margin_type={margin_type!r}, got {margin!r}")
    margin = float(margin)
    if margin_type == "none":
        if margin != 0.0:
            raise ValueError("margin: margin_type='none' (NormFace) takes margin=0.0")
        return Margin()
    if margin_type == "cosface":
        return Margin(m3=margin)
    if margin_type == "arcface":
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"margin: ArcFace margin is in radians and must lie in [0, pi), got {margin} "
                             "(pytorch-metric-learning takes degrees: 28.6 degrees = 0.5 radians)")
        return Margin(m2=margin)
    raise ValueError(
        f"margin_type: expected one of 'none', 'cosface', 'arcface', 'combined', got {margin_type!r}"
    )


def target_function(cos_t: torch.Tensor, margin: Margin, straight_through: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """f(c) and df/dc for the target cosines ``cos_t`` (any float dtype, elementwise)."""
    if margin.is_cosine_only:
        return cos_t - margin.m3, torch.ones_like(cos_t)
    c = cos_t.clamp(-1.0, 1.0)
    theta = torch.acos(c)
    phi = margin.m1 * theta + margin.m2
    in_range = phi <= math.pi
    fallback = c - margin.m3 - margin.m2 * math.sin(margin.m2)
    f = torch.where(in_range, torch.cos(phi) - margin.m3, fallback)
    if straight_through:
        return f, torch.ones_like(cos_t)
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(0.0)).clamp_min(SIN_FLOOR)
    df = torch.where(in_range, margin.m1 * torch.sin(phi) / sin_theta, torch.ones_like(c))
    return f, df
