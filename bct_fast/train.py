"""Thin, readable PyTorch training loops for backward-compatible training.

- :func:`fit`: epochs of ``loss(model(x), y)`` with Adam (or your optimizer), optional AMP, a
  tqdm bar, and atomic, resumable checkpoints: each epoch reseeds the RNG from
  ``(seed, epoch)``, so a run resumed from a checkpoint reproduces an uninterrupted one.
- :func:`embed`: batched, no-grad embeddings + labels.
- :func:`train_bct`: BCT (new classifier loss + influence loss through the old classifier, with
  synthesized rows for new classes, or through the old model's class means for every class;
  new embeddings of another width reach the old space by a slice or a learned projection);
  :func:`train_contrastive`: + a new-to-old contrastive term (HOC, CVPR 2024);
  :func:`train_independent` and :func:`train_l2` are the paper's baselines. The gallery-side
  alternative, a learned transformation of stored old embeddings (FCT), is
  :mod:`bct_fast.transformation`.

A "loader" is any re-iterable of ``(inputs, labels)`` batches (a torch ``DataLoader``, a list).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bct_fast import losses
from bct_fast._core.checks import check_device, embedding_output, module_device
from bct_fast._core.io import atomic_write, remove_stale_temps, writable_folder

__all__ = ["fit", "embed", "train_bct", "train_contrastive", "train_independent", "train_l2",
           "L2RegressionObjective", "ContrastiveObjective", "save_checkpoint", "load_checkpoint",
           "CheckpointError"]

_CKPT_MAGIC = b"BCTCKPT\0"
_CKPT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is not readable: wrong format, truncated or corrupted."""


def _weights_only_loads(payload: bytes) -> bool:
    """Whether ``load_checkpoint``'s unpickler accepts these ``torch.save`` bytes (tensors are
    mapped to the meta device: nothing is copied)."""
    try:
        torch.load(io.BytesIO(payload), map_location="meta", weights_only=True)
        return True
    except (pickle.UnpicklingError, RuntimeError, TypeError, AttributeError):
        return False


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _refused_entry(obj: Any, where: str) -> str:
    """Path of the innermost entry of ``obj`` that weights-only loading refuses (obj is refused)."""
    if isinstance(obj, (dict, list, tuple)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(value, Tensor) and type(value) in (Tensor, nn.Parameter):
                continue  # plain tensors always load
            try:
                ok = _weights_only_loads(_saved(value))
            except Exception:  # the entry alone cannot be pickled: then it is the one
                ok = False
            if not ok:
                return _refused_entry(value, f"{where}[{key!r}]")
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` behind a header with the payload's sha256, written atomically.

    Refuses (TypeError naming the entry, nothing written) a state that :func:`load_checkpoint`
    could not read back: its weights-only unpickler accepts tensors, numbers, strings, bytes,
    containers, torch sizes / dtypes / devices, not arbitrary objects (numpy arrays, paths,
    user classes). The check unpickles the saved bytes onto the meta device (no tensor data)."""
    try:
        payload = _saved(state)
    except Exception as e:  # e.g. a lambda: name the entry, not just the pickler's complaint
        raise TypeError(f"state: {_refused_entry(state, 'state')} cannot be saved ({e})") from e
    if not _weights_only_loads(payload):
        raise TypeError(f"state: {_refused_entry(state, 'state')} cannot be loaded back by load_checkpoint "
                        f"(weights-only unpickling); store it as tensors, numbers, strings or containers")
    header = json.dumps({"format_version": _CKPT_VERSION, "nbytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()

    def write(f):
        f.write(_CKPT_MAGIC + struct.pack("<I", len(header)) + header + payload)
    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a :func:`save_checkpoint` file; checks format, length and checksum, and unpickles
    with ``weights_only=True`` (tensors, numbers, strings, containers only). Also removes
    temporaries of this path left by killed writers (see ``remove_stale_temps``)."""
    remove_stale_temps(path)
    data = Path(path).read_bytes()
    if data[:8] != _CKPT_MAGIC or len(data) < 12:
        raise CheckpointError(f"{path}: not a bct_fast checkpoint (bad magic)")
    hlen = struct.unpack("<I", data[8:12])[0]
    try:
        header = json.loads(data[12:12 + hlen])
        nbytes, digest, version = int(header["nbytes"]), header["sha256"], int(header["format_version"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable header ({e})") from None
    if version > _CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this bct_fast reads")
    payload = data[12 + hlen:]
    if len(payload) != nbytes:
        raise CheckpointError(f"{path}: truncated or padded ({len(payload)} payload bytes, expected {nbytes})")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def _call_loss(loss: nn.Module, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    if getattr(loss, "needs_inputs", False):  # objectives that look at the inputs (L2 baseline)
        return loss(model(x), y, inputs=x)
    return loss(model(x), y)


def _check_finite_parameters(params: list[Tensor], model: nn.Module, loss: nn.Module, epoch: int) -> None:
    """ValueError naming the first NaN / inf parameter: training diverged (a learning rate too
    large, a loss that went NaN). One reduction per parameter per epoch. With fp16 AMP the grad
    scaler skips non-finite steps, so this fires only when an update really was applied."""
    flags = torch.stack([torch.isfinite(p.detach()).all() for p in params]) if params else None
    if flags is None or bool(flags.all()):
        return
    names = {id(p): n for n, p in [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]}
    bad = params[int((~flags).nonzero()[0, 0])]
    raise ValueError(f"training diverged: parameter {names.get(id(bad), '?')} holds NaN or inf after epoch "
                     f"{epoch} (a smaller lr, or gradient clipping, may help); the last checkpoint, if "
                     "any, is from before this epoch")


def fit(model: nn.Module, loss: nn.Module, loader: Iterable, epochs: int,
        optimizer: torch.optim.Optimizer | None = None, *, lr: float = 1e-3, device: str | torch.device = "cpu",
        amp: bool = False, checkpoint: str | os.PathLike | None = None, resume: bool = True,
        seed: int = 0, progress: bool = True, desc: str = "fit",
        on_epoch_end: Callable[[int, float], None] | None = None,
        validate: Callable[[nn.Module, int], dict] | None = None) -> nn.Module:
    """Train ``model`` (and the trainable parameters of ``loss``, e.g. a class weight).

    Args:
        optimizer: default Adam(lr) over the trainable parameters of model and loss.
        amp: autocast (bf16 on CPU, fp16 with a grad scaler on CUDA).
        checkpoint: file written atomically after every epoch (model, loss, optimizer, scaler,
            epoch). With ``resume`` an existing file is loaded and training continues after its
            epoch; the result equals an uninterrupted run with the same seed.
        on_epoch_end: called with (epoch, mean loss).
        validate: called with (model in eval mode, epoch) after every epoch, e.g. a
            :class:`bct_fast.compat_monitor.CompatibilityValidator`; if it has ``restore_best``,
            that is called with the model when training ends (the validator's history is not part
            of the checkpoint: a resumed run validates its remaining epochs only).
    Returns the trained model in eval mode.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs: expected a non-negative integer, got {epochs!r}")
    if optimizer is None and (isinstance(lr, bool) or not isinstance(lr, (numbers.Real, Tensor))
                              or not math.isfinite(float(lr)) or float(lr) < 0):
        raise ValueError(f"lr: expected a finite non-negative number, got {lr!r}")
    device = check_device(device)
    if checkpoint is not None:
        writable_folder(Path(checkpoint).parent)  # now, not after the first epoch
    model.to(device)
    loss.to(device)
    params = [p for p in list(model.parameters()) + list(loss.parameters()) if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    use_scaler = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    start = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        # On the CPU: load_state_dict copies into the parameters' devices, and Adam's step
        # counters must stay host tensors (on a GPU each step would sync on them).
        state = load_checkpoint(checkpoint, map_location="cpu")
        saved_opt = state.get("optimizer_type")
        if saved_opt is not None and saved_opt != type(opt).__name__:
            raise ValueError(f"optimizer: {checkpoint} was written with {saved_opt}, not "
                             f"{type(opt).__name__}; pass the same optimizer type or resume=False")
        model.load_state_dict(state["model"])
        loss.load_state_dict(state["loss"])
        try:
            opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"optimizer: cannot resume from {checkpoint}: its optimizer state does "
                             f"not fit this optimizer ({type(e).__name__}: {e})") from None
        if state.get("scaler"):  # a checkpoint written without AMP (or on a CPU) has none
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
    bar = tqdm(range(start, epochs), desc=desc, disable=not progress, leave=False, initial=start, total=epochs)
    for epoch in bar:
        torch.manual_seed(seed * 100_003 + epoch)  # the epoch's shuffling / augmentation
        model.train()
        total, batches = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                value = _call_loss(loss, model, x, y)
            if value.dim() != 0:
                raise ValueError(f"loss: returned shape {tuple(value.shape)}; fit needs a scalar "
                                 "(use reduction='mean' or 'sum')")
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            total += float(value.detach())
            batches += 1
        if batches == 0:
            raise ValueError(f"loader: yielded no batches (epoch {epoch})")
        _check_finite_parameters(params, model, loss, epoch)  # before a checkpoint could keep them
        mean = total / batches
        bar.set_postfix(loss=f"{mean:.3f}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"epoch": epoch + 1, "model": model.state_dict(), "loss": loss.state_dict(),
                                         "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                         "optimizer_type": type(opt).__name__})
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean)
        if validate is not None:
            model.eval()
            record = validate(model, epoch)
            if isinstance(record, dict):
                bar.set_postfix(loss=f"{mean:.3f}", **{k: f"{v:.3f}" for k, v in record.items()
                                                      if isinstance(v, float)})
    model.eval()
    ran = start < epochs  # a run resumed after its last epoch validated nothing to restore
    if validate is not None and ran and hasattr(validate, "restore_best"):
        validate.restore_best(model)
    return model


@torch.no_grad()
def embed(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None, amp: bool = False,
          progress: bool = False) -> tuple[Tensor, Tensor]:
    """Embeddings [n, d] (fp32, CPU) and labels [n] of every batch of ``loader``, in eval mode.

    ``device``: where the model runs (default: where it is). A model moved there for this call
    goes back where it was afterwards, so that a validation hook inside ``fit`` on a GPU does not
    leave the model on another device than its optimizer state."""
    home = module_device(model)
    device = check_device(device) if device is not None else home
    was_training = model.training
    model.eval().to(device)
    embs, labels = [], []
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    try:
        for x, y in tqdm(loader, desc="embed", disable=not progress, leave=False):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                embs.append(embedding_output(model(x.to(device)), "model").float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training).to(home)
    if not embs:
        raise ValueError("loader: yielded no batches")
    return torch.cat(embs), torch.cat(labels)


@torch.no_grad()
def _frozen_embeddings(old_model: nn.Module, inputs: Tensor) -> Tensor:
    """The frozen old model's embeddings of a batch, in eval mode (fit calls .train() on the new
    model only; BatchNorm). The old model is not a submodule of the objectives, so fit's
    ``.to(device)`` does not reach it: it follows the batch here (once; later calls find it
    there)."""
    if module_device(old_model) != inputs.device:
        old_model.to(inputs.device)
    return embedding_output(old_model.eval()(inputs), "old_model")


class L2RegressionObjective(nn.Module):
    """The paper's L2 baseline: classification loss + weight * ||phi_new(x) - phi_old(x)||^2
    (both normalized; compared on the first min(d_new, d_old) dims)."""

    needs_inputs = True

    def __init__(self, new_loss: nn.Module, old_model: nn.Module, weight: float = 1.0):
        super().__init__()
        self.new_loss, self.weight = new_loss, weight
        self.l2 = losses.L2CompatibilityLoss()
        self._old = (old_model.eval(),)  # a tuple: the frozen old model is not a submodule
        for p in old_model.parameters():
            p.requires_grad_(False)
        self.last_terms: dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: Tensor, *, inputs: Tensor) -> Tensor:
        old = _frozen_embeddings(self._old[0], inputs)
        cls, reg = self.new_loss(embeddings, labels), self.l2(embeddings, old)
        self.last_terms = {"classification": float(cls.detach()), "l2": float(reg.detach())}
        return cls + self.weight * reg


class ContrastiveObjective(nn.Module):
    """``new_loss(x, y) + contrastive_weight * InfoNCE(new, old; y)`` (+ ``influence_weight *
    influence(x, y)`` when an influence loss is given): the HOC objective (Biondi et al., CVPR
    2024) with the classification loss of your choice, optionally on top of BCT's influence term.
    The old model embeds each batch (frozen, no grad). :attr:`last_terms` holds the detached
    terms. Queries against the old gallery use :meth:`to_old_space` (the influence loss's
    slice or projection; without an influence loss, embeddings must already be as wide as the
    old ones)."""

    needs_inputs = True

    def __init__(self, new_loss: nn.Module, old_model: nn.Module, contrastive: nn.Module,
                 contrastive_weight: float = 1.0, influence: nn.Module | None = None,
                 influence_weight: float = 1.0):
        super().__init__()
        for name, w in (("contrastive_weight", contrastive_weight), ("influence_weight", influence_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and w < float("inf")):
                raise ValueError(f"{name}: expected a finite number >= 0, got {w!r}")
        self.new_loss, self.contrastive, self.influence = new_loss, contrastive, influence
        self.contrastive_weight, self.influence_weight = float(contrastive_weight), float(influence_weight)
        self._old = (old_model.eval(),)  # a tuple: the frozen old model is not a submodule
        for p in old_model.parameters():
            p.requires_grad_(False)
        self.last_terms: dict[str, float] = {}

    def to_old_space(self, embeddings: Tensor) -> Tensor:
        if self.influence is not None and hasattr(self.influence, "to_old_space"):
            return self.influence.to_old_space(embeddings)
        return embeddings

    def forward(self, embeddings: Tensor, labels: Tensor, *, inputs: Tensor) -> Tensor:
        old = _frozen_embeddings(self._old[0], inputs)
        cls = self.new_loss(embeddings, labels)
        con = self.contrastive(self.to_old_space(embeddings), old, labels)
        total = cls + self.contrastive_weight * con
        self.last_terms = {"classification": float(cls.detach()), "contrastive": float(con.detach())}
        if self.influence is not None and self.influence_weight > 0:
            inf = self.influence(embeddings, labels)
            total = total + self.influence_weight * inf
            self.last_terms["influence"] = float(inf.detach())
        return total


def _default_loss(num_classes: int, dim: int, scale: float) -> nn.Module:
    return losses.NormSoftmaxLoss(num_classes, dim, scale=scale)


def train_independent(model: nn.Module, loader: Iterable, num_classes: int, embedding_size: int, epochs: int,
                      *, scale: float = 30.0, new_loss: nn.Module | None = None, **fit_kwargs) -> tuple[nn.Module, nn.Module]:
    """Baseline: train the new model alone (no compatibility constraint). Returns (model, loss)."""
    loss = new_loss or _default_loss(num_classes, embedding_size, scale)
    return fit(model, loss, loader, epochs, desc=fit_kwargs.pop("desc", "independent"), **fit_kwargs), loss


def train_l2(new_model: nn.Module, old_model: nn.Module, loader: Iterable, num_classes: int, embedding_size: int,
             epochs: int, *, l2_weight: float = 1.0, scale: float = 30.0, new_loss: nn.Module | None = None,
             **fit_kwargs) -> tuple[nn.Module, nn.Module]:
    """Baseline: classification + L2 regression onto the old model's embeddings."""
    objective = L2RegressionObjective(new_loss or _default_loss(num_classes, embedding_size, scale), old_model, l2_weight)
    return fit(new_model, objective, loader, epochs, desc=fit_kwargs.pop("desc", "l2"), **fit_kwargs), objective


def _influence_classifier(old_model: nn.Module, old_classifier: Tensor | None, loader: Iterable, num_classes: int,
                          synthesize: bool, class_means: bool, device: torch.device | str, progress: bool) -> Tensor:
    """The frozen old-space classifier of the influence loss (see :func:`train_bct`)."""
    if class_means:
        if old_classifier is not None:
            raise ValueError("old_classifier: must be None with class_means=True (the class means "
                             "replace the learned rows)")
        return losses.class_mean_classifier(old_model.to(device), loader, num_classes, device=device,
                                            progress=progress)
    if old_classifier is None:
        raise ValueError("old_classifier: required unless class_means=True")
    old_w = old_classifier.detach().to(device)
    if synthesize and old_w.shape[0] < num_classes:
        old_w = losses.synthesize_classifier(old_model.to(device), loader, old_w, num_classes, device=device,
                                             progress=progress)
    return old_w


def train_bct(new_model: nn.Module, old_model: nn.Module, old_classifier: Tensor | None, loader: Iterable,
              num_classes: int, embedding_size: int, epochs: int, *, influence_weight: float = 1.0,
              synthesize: bool = True, class_means: bool = False, scale: float = 30.0,
              influence_scale: float | None = None, projection: str = "slice",
              new_loss: nn.Module | None = None, device: str | torch.device = "cpu",
              **fit_kwargs) -> tuple[nn.Module, nn.Module]:
    """Backward-compatible training (Shen et al., CVPR 2020).

    The influence loss scores the new embeddings with a frozen classifier in the old space:

    - default (the paper): ``old_classifier`` [C_old, d_old], the old model's learned class
      weight (classes 0..C_old-1 of the new label space). With ``synthesize`` the old model's
      class-mean embeddings of the classes it never saw are appended
      (:func:`bct_fast.losses.synthesize_classifier`), so the influence loss covers every
      training sample; without it, samples of new classes are ignored by the influence term.
    - ``class_means=True``: the old model's class-mean embeddings for EVERY class
      (:func:`bct_fast.losses.class_mean_classifier`, as BT-2 and MixBCT do); pass
      ``old_classifier=None``. This pulls new embeddings to the centre of each class's old
      embeddings, which is what cross-model retrieval rewards; on the demo it is the variant
      that meets the compatibility criterion (see the README).

    ``projection`` (new embeddings wider than the old): ``"slice"`` (the first d_old entries,
    openBCT) or ``"learned"`` (a trained linear map for the cross term only; search the old
    gallery with ``objective.influence_loss.to_old_space(new_embeddings)``); see
    :class:`bct_fast.losses.InfluenceLoss`.

    Returns (model, the BCTLoss used)."""
    progress = fit_kwargs.get("progress", True)
    old_w = _influence_classifier(old_model, old_classifier, loader, num_classes, synthesize, class_means,
                                  device, progress)
    influence = losses.InfluenceLoss(old_w, scale=influence_scale or scale, projection=projection,
                                     new_dim=embedding_size)
    objective = losses.BCTLoss(new_loss or _default_loss(num_classes, embedding_size, scale), influence,
                               influence_weight)
    return fit(new_model, objective, loader, epochs, device=device, desc=fit_kwargs.pop("desc", "bct"),
               **fit_kwargs), objective


def train_contrastive(new_model: nn.Module, old_model: nn.Module, loader: Iterable, num_classes: int,
                      embedding_size: int, epochs: int, *, contrastive_weight: float = 1.0,
                      temperature: float = 0.05, influence_weight: float = 0.0, scale: float = 30.0,
                      projection: str = "slice", new_loss: nn.Module | None = None,
                      device: str | torch.device = "cpu", **fit_kwargs) -> tuple[nn.Module, nn.Module]:
    """HOC-style compatible training (Biondi et al., CVPR 2024): the classification loss plus
    ``contrastive_weight`` x a new-to-old InfoNCE over each batch
    (:class:`bct_fast.losses.OldFeatureContrastiveLoss`: positive = the old model's embedding of
    the same image, negatives = old embeddings of other classes). With ``influence_weight > 0``
    BCT's influence term through the old model's class means is added (the two pull toward the
    old space at the sample and at the class level). HOC also fixes every model's classifier to a
    d-simplex; here the old model is given, so only its compatibility term is used.

    Returns (model, the :class:`ContrastiveObjective` used)."""
    progress = fit_kwargs.get("progress", True)
    old_model.to(device)
    # Built even with influence_weight 0: its to_old_space (slice or learned projection) is how
    # the contrastive term and the old gallery see the new embeddings.
    old_w = _influence_classifier(old_model, None, loader, num_classes, False, True, device, progress)
    influence = losses.InfluenceLoss(old_w, scale=scale, projection=projection, new_dim=embedding_size)
    objective = ContrastiveObjective(new_loss or _default_loss(num_classes, embedding_size, scale), old_model,
                                     losses.OldFeatureContrastiveLoss(temperature), contrastive_weight,
                                     influence, influence_weight)
    return fit(new_model, objective, loader, epochs, device=device, desc=fit_kwargs.pop("desc", "contrastive"),
               **fit_kwargs), objective
