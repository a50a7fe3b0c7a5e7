"""Drop-in loss modules for backward-compatible training (BCT), called like
pytorch-metric-learning losses: ``loss(embeddings, labels)``.

Class weights are stored as ``[num_classes, embedding_size]`` (nn.Linear / insightface layout);
pytorch-metric-learning stores the transpose, see :meth:`CosineClassifierLoss.load_pml_weight`.

What a pytorch-metric-learning user calls works the same: ``loss(embeddings, labels,
indices_tuple=...)`` (a miner's tuple weights the rows as PML's ``convert_to_weights`` does),
``get_logits(embeddings)``, ``weight_init_func``, the PML-layout view ``loss.W``. Differences,
on purpose (README "Coming from pytorch-metric-learning"):

- Hyperparameters are keyword-only: ``ArcFaceLoss(C, d, 0.5)`` is an error, not a silent swap of
  PML's ``(margin, scale)`` order.
- ArcFace ``margin`` is in radians (PML: degrees; 28.6 deg = 0.5 rad); a degree-sized value
  (>= pi) is refused.
- ``NormSoftmaxLoss`` takes ``scale`` or PML's ``temperature`` (= 1 / scale); both default to
  PML's (temperature 0.05, scale 20).
- The weight keeps its dtype under autocast (PML rewrites ``W.data`` to the embeddings' dtype).
- No reducers, distances or regularizers: the loss is the mean over rows (or ``reduction``);
  passing ``reducer`` / ``distance`` / ``*_regularizer`` is a clear error, not an ignored argument.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch
from torch import Tensor, nn

from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import (check_device, check_int, check_labels, check_matrix, embedding_output,
                                   module_device, nonfinite_error)
from bct_fast.ops import MarginValue
from bct_fast.ops import check_loss_options, cosine_margin_cross_entropy, normalize_rows

__all__ = [
    "CosineClassifierLoss", "NormSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "InfluenceLoss",
    "BCTLoss", "L2CompatibilityLoss", "OldFeatureContrastiveLoss", "synthesize_classifier",
    "class_mean_classifier", "match_dim",
]


def match_dim(embeddings: Tensor, dim: int) -> Tensor:
    """First ``dim`` entries of each embedding, zero-padded when the embedding is shorter.

    This is how the BCT authors' code (openBCT) feeds a new model's embedding to an old model's
    classifier of a different width. Zero padding leaves norms and cosines unchanged."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"embeddings: expected a 2-D tensor [rows, dim], got {got}")
    d = embeddings.shape[1]
    if d == dim:
        return embeddings
    if d > dim:
        return embeddings[:, :dim]
    return torch.nn.functional.pad(embeddings, (0, dim - d))


# PML constructor arguments with no counterpart here: refused by name instead of ignored.
_PML_UNSUPPORTED = ("reducer", "distance", "weight_regularizer", "weight_reg_weight",
                    "embedding_regularizer", "embedding_reg_weight", "collect_stats")


def _refuse_pml_only(kwargs: dict) -> None:
    for name in _PML_UNSUPPORTED:
        if name in kwargs:
            raise TypeError(f"{name}: not supported by bct_fast losses (no reducers, distances or "
                            "regularizer hooks); add such a term to the loss value yourself")
    if kwargs:
        raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")


def _miner_weights(indices_tuple: tuple, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-row weights from a miner's indices tuple, as PML's ``convert_to_weights``: rows never
    named get 0, the others their count normalized by the largest count; an empty tuple: all 1."""
    if not isinstance(indices_tuple, (tuple, list)) or not all(isinstance(t, Tensor) for t in indices_tuple):
        raise TypeError("indices_tuple: expected a tuple of index tensors (a miner's output)")
    weights = torch.zeros(labels.shape[0], device=labels.device, dtype=dtype)
    if all(t.numel() == 0 for t in indices_tuple):
        return weights + 1
    idx, counts = torch.unique(torch.cat([t.reshape(-1).to(labels.device) for t in indices_tuple]),
                               return_counts=True)
    if int(idx.min()) < 0 or int(idx.max()) >= labels.shape[0]:
        raise ValueError(f"indices_tuple: indices must lie in [0, {labels.shape[0]}) (rows of the batch)")
    counts = counts.to(dtype)
    weights[idx] = counts / counts.max()
    return weights


class CosineClassifierLoss(nn.Module):
    """Normalized-softmax classification loss with a trainable class weight ``[C, d]``.

    ``weight_init_func``: as in PML, called on a ``[embedding_size, num_classes]`` tensor (PML's
    ``W`` layout; default ``torch.nn.init.normal_``), which is then stored transposed."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float,
                 margin_type: str = "none", margin: MarginValue = 0.0, reduction: str = "mean",
                 label_smoothing: float = 0.0, arcface_grad: str = "exact",
                 ignore_index: int = -100, weight_init_func=None, **pml_only) -> None:
        super().__init__()
        _refuse_pml_only(pml_only)
        num_classes = check_int(num_classes, "num_classes", 1)
        embedding_size = check_int(embedding_size, "embedding_size", 1)
        check_loss_options(scale=scale, margin_type=margin_type, margin=margin, reduction=reduction,
                           label_smoothing=label_smoothing, arcface_grad=arcface_grad)
        w_pml = torch.empty(embedding_size, num_classes)
        if weight_init_func is None:
            nn.init.normal_(w_pml)
        elif callable(weight_init_func):
            weight_init_func(w_pml)
        else:
            raise TypeError(f"weight_init_func: expected a callable, got {type(weight_init_func).__name__}")
        self.weight = nn.Parameter(w_pml.T.contiguous())
        self.kwargs = dict(scale=float(scale), margin_type=margin_type, margin=margin,
                           reduction=reduction, label_smoothing=label_smoothing,
                           arcface_grad=arcface_grad, ignore_index=ignore_index)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def __setattr__(self, name: str, value) -> None:
        if name == "W":  # nn.Module would register a second, unused parameter without a word
            raise AttributeError("W: bct_fast stores the class weight as `weight` [num_classes, "
                                 "embedding_size]; use load_pml_weight(W) for a PML-layout tensor")
        super().__setattr__(name, value)

    @property
    def W(self) -> Tensor:
        """The class weight in PML's layout ``[embedding_size, num_classes]`` (a view of ``weight``)."""
        return self.weight.T

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: tuple | None = None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        """The loss of ``embeddings`` [B, d] with ``labels`` [B]. ``indices_tuple`` (a PML miner's
        output) weights rows as PML does; ``ref_emb`` / ``ref_labels`` are refused, as PML's
        classification losses refuse them."""
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb: classification losses compare embeddings with class weights, "
                             "not with reference embeddings (PML refuses it too)")
        if indices_tuple is None:
            return cosine_margin_cross_entropy(embeddings, self.weight, labels, **self.kwargs)
        check_labels(labels, "labels", embeddings.shape[0] if isinstance(embeddings, Tensor) else None, None)
        kw = dict(self.kwargs, reduction="none")
        rows = cosine_margin_cross_entropy(embeddings, self.weight, labels, **kw)
        rows = rows * _miner_weights(indices_tuple, labels, rows.dtype)
        if self.kwargs["reduction"] == "none":
            return rows
        if self.kwargs["reduction"] == "sum":
            return rows.sum()
        n = (labels != self.kwargs["ignore_index"]).sum().clamp_min(1)
        return rows.sum() / n

    @torch.no_grad()
    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``scale * cos(embeddings, class rows)`` [B, C] without the margin, as PML's
        ``get_logits`` (inference; this one materializes B x C)."""
        check_matrix(embeddings, "embeddings")
        w = self.weight.to(embeddings.device)
        return self.kwargs["scale"] * (normalize_rows(embeddings.float()) @ normalize_rows(w.float()).T)

    @torch.no_grad()
    def load_pml_weight(self, W: Tensor) -> None:
        """Load a pytorch-metric-learning weight ``W`` of shape [embedding_size, num_classes]."""
        check_matrix(W, "W")
        if tuple(W.shape) != (self.weight.shape[1], self.weight.shape[0]):
            raise ValueError(f"W: expected shape {(self.weight.shape[1], self.weight.shape[0])} "
                             f"(PML layout [embedding_size, num_classes]), got {tuple(W.shape)}")
        self.weight.copy_(W.t())

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, embedding_size={self.weight.shape[1]}, " + \
            ", ".join(f"{k}={v}" for k, v in self.kwargs.items())


class NormSoftmaxLoss(CosineClassifierLoss):
    """NormFace: cross-entropy over ``scale * cos(x, w_j)``. Give ``scale`` or PML's
    ``temperature`` (= 1 / scale); the default is PML's temperature 0.05 (scale 20)."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float | None = None,
                 temperature: float | None = None, **kwargs) -> None:
        if scale is not None and temperature is not None:
            raise ValueError("temperature: give scale or temperature (= 1 / scale), not both")
        if temperature is not None:
            if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real)
                                                     and math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature: expected a finite positive number, got {temperature!r}")
            scale = 1.0 / temperature
        super().__init__(num_classes, embedding_size, scale=20.0 if scale is None else scale,
                         margin_type="none", **kwargs)


class CosFaceLoss(CosineClassifierLoss):
    """CosFace: target logit ``scale * (cos - margin)`` (PML's defaults: margin 0.35, scale 64)."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0,
                 margin: float = 0.35, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, scale=scale, margin_type="cosface",
                         margin=margin, **kwargs)


class ArcFaceLoss(CosineClassifierLoss):
    """ArcFace: target logit ``scale * cos(theta + margin)``, margin in **radians** (PML: degrees;
    its default 28.6 degrees is this default 0.5). ``arcface_grad="straight_through"``
    reproduces insightface's arcface_torch gradient."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0,
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

    New embeddings of another width reach the old space through ``projection``:

    - ``"slice"`` (default; openBCT): the first ``d_old`` entries, zero-padded when narrower
      (:func:`match_dim`). The old gallery is then searched with that slice of the new query.
    - ``"learned"``: a trainable linear map ``d_new -> d_old`` (initialized as the slice), trained
      with the new model by the influence term only: the new embedding keeps all of its width
      for new/new, and only the cross term is constrained (the learned cross-model projection
      the BCT paper's appendix and BT-2 discuss). Queries against the old gallery use
      :meth:`to_old_space`. Needs ``new_dim``.
    """

    def __init__(self, old_weight: Tensor, *, scale: float = 30.0, margin_type: str = "none",
                 margin: MarginValue = 0.0, arcface_grad: str = "exact",
                 label_smoothing: float = 0.0, unknown_labels: str = "ignore",
                 projection: str = "slice", new_dim: int | None = None) -> None:
        super().__init__()
        check_matrix(old_weight, "old_weight")
        if projection not in ("slice", "learned"):
            raise ValueError(f"projection: expected 'slice' or 'learned', got {projection!r}")
        self.projection: nn.Linear | None = None
        if projection == "learned":
            if new_dim is None:
                raise ValueError("new_dim: required with projection='learned' (the new embedding width)")
            new_dim = check_int(new_dim, "new_dim", 1)
            self.projection = nn.Linear(new_dim, old_weight.shape[1], bias=False)
            with torch.no_grad():  # start from the slice: the paper's recipe is the first step
                self.projection.weight.copy_(torch.eye(old_weight.shape[1], new_dim))
        if unknown_labels not in ("ignore", "raise"):
            raise ValueError(f"unknown_labels: expected 'ignore' or 'raise', got {unknown_labels!r}")
        check_loss_options(scale=scale, margin_type=margin_type, margin=margin,
                           label_smoothing=label_smoothing, arcface_grad=arcface_grad)
        self.register_buffer("old_weight", old_weight.detach().clone())
        self.unknown_labels = unknown_labels
        self.kwargs = dict(scale=float(scale), margin_type=margin_type, margin=margin,
                           arcface_grad=arcface_grad, label_smoothing=label_smoothing)

    def to_old_space(self, embeddings: Tensor) -> Tensor:
        """The new embeddings as the old classifier (and an old gallery) sees them."""
        check_matrix(embeddings, "embeddings")
        if self.projection is None:
            return match_dim(embeddings, self.old_weight.shape[1])
        if embeddings.shape[1] != self.projection.in_features:
            raise ValueError(f"embeddings: dim {embeddings.shape[1]}, but the learned projection takes "
                             f"{self.projection.in_features}")
        w = self.projection.weight  # on the device fit trained it on; results where the input is
        return self.projection(embeddings.to(w.device, w.dtype)).to(embeddings.device)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_matrix(embeddings, "embeddings")
        check_labels(labels, "labels", embeddings.shape[0], embeddings.device)
        x = self.to_old_space(embeddings)
        ignore = -100
        labels = labels.long()  # uint8 / int32 labels: -100 must be representable
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
        check_matrix(new_embeddings, "new_embeddings")
        check_matrix(old_embeddings, "old_embeddings")
        if old_embeddings.shape[0] != new_embeddings.shape[0]:
            raise ValueError(f"old_embeddings: expected shape [{new_embeddings.shape[0]}, d_old], "
                             f"got {tuple(old_embeddings.shape)}")
        for name, t in (("new_embeddings", new_embeddings), ("old_embeddings", old_embeddings)):
            if not bool(torch.isfinite(t.detach()).all()):  # every other entry point refuses NaN too
                raise nonfinite_error({name: t.detach()})
        new = match_dim(new_embeddings, old_embeddings.shape[1]).float()
        old = old_embeddings.detach().float()
        if self.normalize:
            new, old = normalize_rows(new), normalize_rows(old)
        return (new - old).pow(2).sum(1).mean()


class OldFeatureContrastiveLoss(nn.Module):
    """New-to-old InfoNCE (the compatibility term of HOC, Biondi et al., CVPR 2024, as in
    miccunifi/iamcl2r; Hot-Refresh's ``contra`` loss is the same idea without the mask).

    For a batch, row i's logits are ``cos(new_i, old_j) / temperature`` over the OLD model's
    embeddings ``old_j`` of the same batch; the positive is ``old_i`` (the same image), the
    negatives are the old embeddings of OTHER classes; other images of class ``y_i`` are masked
    out (they are neither positive nor negative). Unlike regression onto ``old_i`` (the L2
    baseline), it only asks that ``new_i`` be closer to its own old embedding than to other
    classes' ones, which is what retrieval in the old gallery rewards; unlike the influence
    loss with class means, it sees how the old model embeds each individual image.

    The term is a B x B cross-entropy (B = batch size): the class-sized terms stay on the fused
    op; this one is small enough for plain PyTorch. New embeddings of another width are sliced
    or padded (:func:`match_dim`), or pass them through a projection first.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real)
                                                 and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    @without_autocast  # fp32 logits: under CUDA AMP the B x B product would be fp16 (1/T up to 20+)
    def forward(self, new_embeddings: Tensor, old_embeddings: Tensor, labels: Tensor) -> Tensor:
        check_matrix(new_embeddings, "new_embeddings")
        check_matrix(old_embeddings, "old_embeddings")
        n = new_embeddings.shape[0]
        if old_embeddings.shape[0] != n:
            raise ValueError(f"old_embeddings: expected {n} rows (one per new embedding), got "
                             f"{old_embeddings.shape[0]}")
        check_labels(labels, "labels", n, new_embeddings.device)
        for name, t in (("new_embeddings", new_embeddings), ("old_embeddings", old_embeddings)):
            if not bool(torch.isfinite(t.detach()).all()):
                raise nonfinite_error({name: t.detach()})
        new = normalize_rows(match_dim(new_embeddings, old_embeddings.shape[1]).float())
        old = normalize_rows(old_embeddings.detach().float())
        logits = new @ old.T / self.temperature
        same_class = labels[:, None] == labels[None, :]
        own = torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same_class & ~own, float("-inf"))
        return nn.functional.cross_entropy(logits, torch.arange(n, device=logits.device))


@torch.no_grad()
def _class_means(old_model: nn.Module, loader: Iterable, first_class: int, num_classes: int,
                 dim: int | None, device: torch.device | None, progress: bool) -> Tensor:
    """Mean of the old model's L2-normalized embeddings for classes [first_class, num_classes)."""
    from tqdm.auto import tqdm

    # The model runs where it lives; `device` is only where the means are kept and returned.
    model_device = module_device(old_model)
    device = model_device if device is None else device
    sums = counts = None
    was_training = old_model.training
    old_model.eval()
    try:
        for inputs, labels in tqdm(loader, desc="class means", disable=not progress, leave=False):
            check_labels(labels, "loader: labels", None, None)
            labels = labels.to(device)
            keep = (labels >= first_class) & (labels < num_classes)
            if not bool(keep.any()):
                continue
            emb = embedding_output(old_model(inputs.to(model_device)), "old_model").float().to(device)
            if emb.dim() != 2 or (dim is not None and emb.shape[1] != dim):
                raise ValueError(f"old_model: returns shape {tuple(emb.shape)}, expected [batch, "
                                 f"{dim if dim is not None else 'd_old'}]")
            if sums is None:
                sums = torch.zeros(num_classes - first_class, emb.shape[1], device=device)
                counts = torch.zeros(num_classes - first_class, device=device)
            rows = labels[keep] - first_class
            sums.index_add_(0, rows, normalize_rows(emb[keep]))
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
    num_classes = check_int(num_classes, "num_classes", 1)
    rows = _class_means(old_model, loader, 0, num_classes, None,
                        check_device(device) if device is not None else None, progress)
    return normalize_rows(rows) if normalize else rows


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
    check_matrix(old_weight, "old_weight")
    num_classes = check_int(num_classes, "num_classes", 1)
    c_old, d_old = old_weight.shape
    if num_classes < c_old:
        raise ValueError(f"num_classes: {num_classes} is smaller than old_weight's {c_old} rows")
    device = check_device(device) if device is not None else old_weight.device
    old = old_weight.detach().to(device=device, dtype=torch.float32)
    if num_classes == c_old:
        return old
    rows = _class_means(old_model, loader, c_old, num_classes, d_old, device, progress)
    if normalize:
        rows = normalize_rows(rows)
    return torch.cat([old, rows], 0)
