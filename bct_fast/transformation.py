"""Upgrade a gallery without re-embedding its images: a learned transformation of the stored old
embeddings into the new model's space (FCT: Ramanujan et al., "Forward Compatible Training for
Large-Scale Embedding Retrieval Systems", CVPR 2022; apple/ml-fct).

    h = EmbeddingTransformation(old_dim, new_dim)
    train_transformation(h, old_model, new_model, new_classifier, loader, epochs=30)
    upgraded = upgrade_gallery(h, old_gallery_embeddings)   # search it with new-model queries
    transformation_cost(h, new_model, example_image)         # FLOPs per item vs re-embedding

Unlike BCT, the new model is trained freely (no compatibility term: its new/new is that of
independent training) and the old gallery is rewritten once, at the cost of a small MLP per
stored vector instead of a forward pass of the new model per stored image. FCT also feeds "side
information" (a second, task-independent embedding stored with each item) to the transformation;
this module implements the variant without it (a gallery that never stored side information).

The transformation takes L2-normalized old embeddings (what :class:`bct_fast.gallery.GalleryIndex`
stores). It is trained on the training images with ml-fct's two terms: a similarity term
``|| n(h(old(x))) - n(new(x)) ||^2`` and a discriminative term, the new model's frozen classifier
applied to ``h(old(x))`` (through the fused frozen-classifier op, :class:`bct_fast.losses.
InfluenceLoss`).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bct_fast import losses
from bct_fast._core.checks import check_device, check_int, check_matrix, module_device, nonfinite_error
from bct_fast.ops import normalize_rows
from bct_fast.train import embed

__all__ = ["EmbeddingTransformation", "train_transformation", "upgrade_gallery", "transformation_cost"]


class EmbeddingTransformation(nn.Module):
    """h: old space [d_old] -> new space [d_new]; an MLP (Linear-BN-ReLU blocks, then Linear),
    the shape of ml-fct's transformation without the side-information branch. Inputs are
    normalized inside, so stored unit vectors and raw old embeddings give the same output."""

    def __init__(self, old_dim: int, new_dim: int, *, hidden: int | None = None, blocks: int = 2) -> None:
        super().__init__()
        old_dim, new_dim = check_int(old_dim, "old_dim", 1), check_int(new_dim, "new_dim", 1)
        hidden = check_int(hidden if hidden is not None else 4 * max(old_dim, new_dim), "hidden", 1)
        blocks = check_int(blocks, "blocks", 1)
        layers: list[nn.Module] = []
        width = old_dim
        for _ in range(blocks):
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, new_dim))
        self.net = nn.Sequential(*layers)
        self.old_dim, self.new_dim = old_dim, new_dim

    def forward(self, old_embeddings: Tensor) -> Tensor:
        if old_embeddings.dim() != 2 or old_embeddings.shape[1] != self.old_dim:
            raise ValueError(f"old_embeddings: expected shape [n, {self.old_dim}], got {tuple(old_embeddings.shape)}")
        return self.net(normalize_rows(old_embeddings.float()))


def train_transformation(transformation: EmbeddingTransformation, old_model: nn.Module, new_model: nn.Module,
                         new_classifier: Tensor | None, loader: Iterable, epochs: int, *,
                         similarity_weight: float = 1.0, discriminative_weight: float = 1.0,
                         scale: float = 16.0, lr: float = 1e-3, batch_size: int = 256,
                         device: str | torch.device = "cpu", seed: int = 0,
                         progress: bool = True) -> EmbeddingTransformation:
    """Train ``transformation`` so that h(old(x)) lands where new(x) is.

    Both frozen models embed ``loader``'s images once; the transformation is then trained on those
    embedding pairs for ``epochs`` passes (Adam ``lr``, shuffled batches of ``batch_size``).

    Args:
        new_classifier: the new model's class weight [C, d_new] (e.g. ``new_loss.weight``) for
            the discriminative term (scale ``scale``), or None to train on similarity only.
        similarity_weight, discriminative_weight: the two terms' weights (ml-fct's ``mu_similarity``,
            ``mu_disc``).
    Returns the transformation in eval mode.
    """
    device = check_device(device)
    epochs = check_int(epochs, "epochs", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    old_e, labels = embed(old_model, loader, device=device)
    new_e, labels_new = embed(new_model, loader, device=device)
    if not torch.equal(labels, labels_new):
        raise ValueError("loader: yields its batches in a different order on each pass; pass a loader "
                         "without shuffling (both models must embed the same images in the same order)")
    if old_e.shape[1] != transformation.old_dim or new_e.shape[1] != transformation.new_dim:
        raise ValueError(f"transformation: maps {transformation.old_dim} -> {transformation.new_dim} dims, but "
                         f"the old model gives {old_e.shape[1]} and the new model {new_e.shape[1]}")
    disc = None
    if new_classifier is not None and discriminative_weight > 0:
        check_matrix(new_classifier, "new_classifier")
        if new_classifier.shape[1] != new_e.shape[1]:
            raise ValueError(f"new_classifier: dim {new_classifier.shape[1]}, but the new model gives {new_e.shape[1]}")
        disc = losses.InfluenceLoss(new_classifier.detach().float(), scale=scale).to(device)
    transformation.to(device)
    old_e, new_e, labels = old_e.to(device), normalize_rows(new_e.to(device)), labels.to(device)
    opt = torch.optim.Adam(transformation.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(epochs), desc="transformation", disable=not progress, leave=False)
    for _ in bar:
        transformation.train()
        order = torch.randperm(len(labels), generator=gen).to(device)
        total = 0.0
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            if idx.numel() < 2 and len(order) >= 2:
                continue  # BatchNorm needs two rows; a one-row tail is dropped this epoch
            out = transformation(old_e[idx])
            loss = similarity_weight * (normalize_rows(out) - new_e[idx]).pow(2).sum(1).mean()
            if disc is not None:
                loss = loss + discriminative_weight * disc(out, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        bar.set_postfix(loss=f"{total / len(order):.3f}")
    return transformation.eval()


@torch.no_grad()
def upgrade_gallery(transformation: EmbeddingTransformation, old_embeddings: Tensor, *,
                    batch_size: int = 65536, progress: bool = False) -> Tensor:
    """h(old) for every stored old embedding, in batches (eval mode); fp32 on the input's device.
    Search the result with new-model queries."""
    check_matrix(old_embeddings, "old_embeddings")
    if not bool(torch.isfinite(old_embeddings).all()):  # would come out as NaN rows, searched later
        raise nonfinite_error({"old_embeddings": old_embeddings})
    batch_size = check_int(batch_size, "batch_size", 1)
    was_training = transformation.training
    transformation.eval()
    device = module_device(transformation)
    parts = []
    for b0 in tqdm(range(0, old_embeddings.shape[0], batch_size), desc="upgrade gallery", disable=not progress,
                   leave=False):
        parts.append(transformation(old_embeddings[b0:b0 + batch_size].to(device)).to(old_embeddings.device))
    transformation.train(was_training)
    return torch.cat(parts) if parts else old_embeddings.new_empty(0, transformation.new_dim, dtype=torch.float32)


@torch.no_grad()
def transformation_cost(transformation: EmbeddingTransformation, new_model: nn.Module, example_input: Tensor) -> dict:
    """FLOPs per gallery item: transforming its stored old embedding vs re-embedding its image
    with the new model (``example_input``: one input, with or without the batch dimension).
    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = example_input if example_input.dim() > 0 and example_input.shape[0] == 1 else example_input[None]
    device = module_device(new_model)
    counts = {}
    for name, module, inp in (("transform", transformation, torch.zeros(1, transformation.old_dim)),
                              ("reembed", new_model, x)):
        was_training = module.training
        module.eval()
        dev = module_device(module) if name == "transform" else device
        with FlopCounterMode(display=False) as fc:
            module(inp.to(dev))
        module.train(was_training)
        counts[name] = int(fc.get_total_flops())
    return {"transform_flops": counts["transform"], "reembed_flops": counts["reembed"],
            "reembed_over_transform": counts["reembed"] / max(counts["transform"], 1)}
