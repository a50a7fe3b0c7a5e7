"""Drop-in loss modules for backward-compatible training (BCT), called like
pytorch-metric-learning losses: ``loss(embeddings, labels)``.

Class weights are stored as ``[num_classes, embedding_size]`` (nn.Linear / insightface layout);
pytorch-metric-learning stores the transpose, see :meth:`CosineClassifierLoss.load_pml_weight`.

Differences from pytorch-metric-learning, on purpose:
- ArcFace ``margin`` is in radians (PML: degrees; 28.6 deg = 0.5 rad).
- ``NormSoftmaxLoss`` takes ``scale`` (PML's ``NormalizedSoftmaxLoss`` takes temperature = 1/scale).
- The weight keeps its dtype under autocast (PML rewrites ``W.data`` to the embeddings' dtype).
- No miners / reducers / regularizers: the loss is the mean over rows (or ``reduction``).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch
from torch import Tensor, nn

from bct_fast._core.checks import check_device
from bct_fast.ops import MarginValue
from bct_fast.ops import check_loss_options, cosine_margin_cross_entropy

__all__ = [
    "CosineClassifierLoss", "NormSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "InfluenceLoss",
    "BCTLoss", "L2CompatibilityLoss", "synthesize_classifier", "class_mean_classifier", "match_dim",
]


def match_dim(embeddings: Tensor, dim: int) -> Tensor:
    """First ``dim`` entries of each embedding, zero-padded when the embedding is shorter.

    This is how the BCT authors' code (openBCT) feeds a new model's embedding to an old model's
    classifier of a different width. Zero padding leaves norms and cosines unchanged."""
    d = embeddings.shape[1]
    if d == dim:
        return embeddings
    if d > dim:
        return embeddings[:, :dim]
    return torch.nn.functional.pad(embeddings, (0, dim - d))


class CosineClassifierLoss(nn.Module):
    """Normalized-softmax classification loss with a trainable class weight ``[C, d]``."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float,
                 margin_type: str = "none", margin: MarginValue = 0.0, reduction: str = "mean",
                 label_smoothing: float = 0.0, arcface_grad: str = "exact",
                 ignore_index: int = -100) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
        check_loss_options(scale=scale, margin_type=margin_type, margin=margin, reduction=reduction,
                           label_smoothing=label_smoothing, arcface_grad=arcface_grad)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight)
        self.kwargs = dict(scale=float(scale), margin_type=margin_type, margin=margin,
                           reduction=reduction, label_smoothing=label_smoothing,
                           arcface_grad=arcface_grad, ignore_index=ignore_index)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return cosine_margin_cross_entropy(embeddings, self.weight, labels, **self.kwargs)

    @torch.no_grad()
    def load_pml_weight(self, W: Tensor) -> None:
        """Load a pytorch-metric-learning weight ``W`` of shape [embedding_size, num_classes]."""
        if tuple(W.shape) != (self.weight.shape[1], self.weight.shape[0]):
            raise ValueError(f"W: expected shape {(self.weight.shape[1], self.weight.shape[0])} "
                             f"(PML layout [embedding_size, num_classes]), got {tuple(W.shape)}")
        self.weight.copy_(W.t())

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, embedding_size={self.weight.shape[1]}, " + \
            ", ".join(f"{k}={v}" for k, v in self.kwargs.items())


class NormSoftmaxLoss(CosineClassifierLoss):
    """NormFace: cross-entropy over ``scale * cos(x, w_j)``."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 30.0, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, scale=scale, margin_type="none", **kwargs)


class CosFaceLoss(CosineClassifierLoss):
    """CosFace: target logit ``scale * (cos - margin)``."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0,
                 margin: float = 0.35, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, scale=scale, margin_type="cosface",
                         margin=margin, **kwargs)


class ArcFaceLoss(CosineClassifierLoss):
    """ArcFace: target logit ``scale * cos(theta + margin)``, margin in **radians**.

    ``arcface_grad="straight_through"`` reproduces insightface's arcface_torch gradient."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 64.0,
                 margin: float = 0.5, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, scale=scale, margin_type="arcface",
                         margin=margin, **kwargs)


class InfluenceLoss(nn.Module):
    """BCT influence loss: the OLD model's frozen classifier applied to NEW embeddings.

    Args:
        old_weight: [C_old, d_old] classifier of the old model (optionally with synthesized rows
            for new classes appended, see :func:`synthesize_classifier`). Stored as a buffer:
            it never receives a gradient, which selects the one-pass fused path.
        scale, margin_type, margin, arcface_grad, label_smoothing: the old model's loss.
        unknown_labels: ``"ignore"`` drops rows whose label has no row in ``old_weight``
            (openBCT's behaviour without a synthesized classifier); ``"raise"`` treats them as
            an error.

    New embeddings wider than ``d_old`` use their first ``d_old`` entries; narrower ones are
    zero-padded (:func:`match_dim`).
    """

    def __init__(self, old_weight: Tensor, *, scale: float = 30.0, margin_type: str = "none",
                 margin: MarginValue = 0.0, arcface_grad: str = "exact",
                 label_smoothing: float = 0.0, unknown_labels: str = "ignore") -> None:
        super().__init__()
        if not isinstance(old_weight, Tensor) or old_weight.dim() != 2:
            raise ValueError("old_weight: expected a 2-D tensor [num_old_classes, old_dim]")
        if unknown_labels not in ("ignore", "raise"):
            raise ValueError(f"unknown_labels: expected 'ignore' or 'raise', got {unknown_labels!r}")
        check_loss_options(scale=scale, margin_type=margin_type, margin=margin,
                           label_smoothing=label_smoothing, arcface_grad=arcface_grad)
        self.register_buffer("old_weight", old_weight.detach().clone())
        self.unknown_labels = unknown_labels
        self.kwargs = dict(scale=float(scale), margin_type=margin_type, margin=margin,
                           arcface_grad=arcface_grad, label_smoothing=label_smoothing)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = match_dim(embeddings, self.old_weight.shape[1])
        ignore = -100
        if self.unknown_labels == "ignore":
            labels = torch.where(labels < self.old_weight.shape[0], labels, torch.full_like(labels, ignore))
        return cosine_margin_cross_entropy(x, self.old_weight, labels, ignore_index=ignore, **self.kwargs)


class BCTLoss(nn.Module):
    """The BCT objective ``L = new_loss(x, y) + influence_weight * influence_loss(x, y)``.

    After each call, :attr:`last_terms` holds the detached terms for logging:
    ``{"new": ..., "influence": ..., "total": ...}``."""

    def __init__(self, new_loss: nn.Module, influence_loss: nn.Module, influence_weight: float = 1.0) -> None:
        super().__init__()
        for name, loss in (("new_loss", new_loss), ("influence_loss", influence_loss)):
            if not isinstance(loss, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module loss(embeddings, labels), got {type(loss).__name__}")
        if isinstance(influence_weight, bool) or not (isinstance(influence_weight, numbers.Real)
                                                      and math.isfinite(influence_weight) and influence_weight >= 0):
            raise ValueError(f"influence_weight: expected a finite number >= 0, got {influence_weight!r}")
        self.new_loss = new_loss
        self.influence_loss = influence_loss
        self.influence_weight = float(influence_weight)
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        new = self.new_loss(embeddings, labels)
        influence = self.influence_loss(embeddings, labels)
        total = new + self.influence_weight * influence
        self.last_terms = {"new": new.detach(), "influence": influence.detach(), "total": total.detach()}
        return total


class L2CompatibilityLoss(nn.Module):
    """Baseline of the BCT paper: regress new embeddings onto the old model's embeddings.

    ``mean_i || n(new_i[:d_old]) - n(old_i) ||^2`` with n = L2 normalization (``normalize=True``)
    or identity. The paper shows this fails the empirical compatibility criterion."""

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, new_embeddings: Tensor, old_embeddings: Tensor) -> Tensor:
        if old_embeddings.dim() != 2 or old_embeddings.shape[0] != new_embeddings.shape[0]:
            raise ValueError(f"old_embeddings: expected shape [{new_embeddings.shape[0]}, d_old], "
                             f"got {tuple(old_embeddings.shape)}")
        new = match_dim(new_embeddings, old_embeddings.shape[1]).float()
        old = old_embeddings.detach().float()
        if self.normalize:
            new, old = nn.functional.normalize(new, dim=1), nn.functional.normalize(old, dim=1)
        return (new - old).pow(2).sum(1).mean()


@torch.no_grad()
def _class_means(old_model: nn.Module, loader: Iterable, first_class: int, num_classes: int,
                 dim: int | None, device: torch.device | None, progress: bool) -> Tensor:
    """Mean of the old model's L2-normalized embeddings for classes [first_class, num_classes)."""
    from tqdm.auto import tqdm

    if device is None:
        device = next((p.device for p in old_model.parameters()), torch.device("cpu"))
    sums = counts = None
    was_training = old_model.training
    old_model.eval()
    try:
        for inputs, labels in tqdm(loader, desc="class means", disable=not progress, leave=False):
            labels = labels.to(device)
            keep = (labels >= first_class) & (labels < num_classes)
            if not bool(keep.any()):
                continue
            emb = old_model(inputs.to(device)).float()
            if emb.dim() != 2 or (dim is not None and emb.shape[1] != dim):
                raise ValueError(f"old_model: returns shape {tuple(emb.shape)}, expected [batch, "
                                 f"{dim if dim is not None else 'd_old'}]")
            if sums is None:
                sums = torch.zeros(num_classes - first_class, emb.shape[1], device=device)
                counts = torch.zeros(num_classes - first_class, device=device)
            rows = labels[keep] - first_class
            sums.index_add_(0, rows, nn.functional.normalize(emb[keep], dim=1))
            counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
    finally:
        old_model.train(was_training)
    missing = (torch.arange(first_class, num_classes) if counts is None
               else (counts == 0).nonzero()[:, 0].cpu() + first_class)
    if missing.numel():
        raise ValueError(f"loader: no samples of classes {missing[:10].tolist()}"
                         f"{'...' if missing.numel() > 10 else ''}; cannot compute their mean embeddings")
    return sums / counts[:, None]


def class_mean_classifier(old_model: nn.Module, loader: Iterable, num_classes: int, *,
                          normalize: bool = True, device: torch.device | str | None = None,
                          progress: bool = True) -> Tensor:
    """The old model's class prototypes for EVERY class: row k is the mean of its L2-normalized
    embeddings of the class-k samples in ``loader`` (normalized again when ``normalize``).

    Used as the influence loss's classifier in place of the old model's learned weights, as the
    BCT baselines of BT-2 (``pseudo_classifier``) and MixBCT (``avg_old_features``) do. The
    learned rows of a softmax classifier need not sit at the centre of the class's old
    embeddings; the means do, and that is where new queries must land to find old gallery
    items (``bct-fast demo`` compares both).

    Returns:
        [num_classes, d_old] float32 tensor on ``device`` (default: the old model's device).
    """
    rows = _class_means(old_model, loader, 0, num_classes, None,
                        check_device(device) if device is not None else None, progress)
    return nn.functional.normalize(rows, dim=1) if normalize else rows


def synthesize_classifier(old_model: nn.Module, loader: Iterable, old_weight: Tensor,
                          num_classes: int, *, normalize: bool = True,
                          device: torch.device | str | None = None,
                          progress: bool = True) -> Tensor:
    """Old classifier extended with synthesized rows for the classes it never saw.

    Row ``k >= len(old_weight)`` is the mean of the old model's L2-normalized embeddings of the
    class-``k`` samples in ``loader`` (BCT, Sec. 3.2; openBCT ``ClassifierGenerator``), L2-
    normalized itself when ``normalize`` (default; cosine losses normalize rows anyway, so it
    only matters for plain linear use). ``loader`` yields ``(inputs, labels)`` batches.

    Returns:
        [num_classes, d_old] float32 tensor on ``old_weight``'s device.
    """
    c_old, d_old = old_weight.shape
    if num_classes < c_old:
        raise ValueError(f"num_classes: {num_classes} is smaller than old_weight's {c_old} rows")
    device = check_device(device) if device is not None else old_weight.device
    old = old_weight.detach().to(device=device, dtype=torch.float32)
    if num_classes == c_old:
        return old
    rows = _class_means(old_model, loader, c_old, num_classes, d_old, device, progress)
    if normalize:
        rows = nn.functional.normalize(rows, dim=1)
    return torch.cat([old, rows], 0)
