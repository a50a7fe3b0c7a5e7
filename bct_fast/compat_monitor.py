"""Compatibility-aware training: a cross-test on a validation split after every epoch, and the
checkpoint that is best by a stated rule.

    val = CompatibilityValidator(val_query_loader, old_val_query_emb,
                                 gallery_loader=val_gallery_loader, old_gallery=old_val_gallery_emb)
    train.fit(new_model, bct_loss, loader, epochs=20, validate=val)   # restores the chosen epoch
    val.history; val.chosen; val.plot("curves.png")

The old model's embeddings of the validation images are computed once by the caller (the old
gallery is what a deployed system already holds); each epoch embeds only the validation images
with the new model. The rule (:func:`choose_epoch`): the epoch with the highest new/old among those
whose new/new is within ``new_new_tolerance`` of the best new/new seen, i.e. the most compatible
model that gives up at most that much of the upgrade itself.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from bct_fast._core.checks import check_matrix
from bct_fast.evaluate import cross_test, pyplot, save_png
from bct_fast.train import embed

__all__ = ["CompatibilityValidator", "choose_epoch"]


def choose_epoch(history: list[dict], new_new_tolerance: float) -> dict:
    """The record with the highest ``new_old`` among those whose ``new_new`` is at least the best
    ``new_new`` minus ``new_new_tolerance`` (ties: the higher ``new_new``, then the earlier epoch)."""
    if not history:
        raise ValueError("history: no epoch was evaluated")
    floor = max(r["new_new"] for r in history) - new_new_tolerance
    eligible = [r for r in history if r["new_new"] >= floor]
    return max(eligible, key=lambda r: (r["new_old"], r["new_new"], -r["epoch"]))


class CompatibilityValidator:
    """Pass as ``train.fit(..., validate=...)``: called with ``(model, epoch)`` after every epoch,
    it records old/old, new/new and new/old of ``metric`` (and whether the criterion holds), keeps
    the model states that the rule could still choose (the Pareto front of (new/new, new/old), on
    the CPU), and :meth:`restore_best` loads the chosen one when training ends.

    Args:
        query_loader: ``(images, labels)`` batches of the validation queries.
        old_queries: the old model's embeddings of those queries [n_q, d_old].
        gallery_loader, old_gallery: the same for a validation gallery; without them the queries
            are their own gallery (leave-one-out).
        metric: the metric of the rule and of the criterion (a key of ``evaluate_retrieval``).
        new_new_tolerance: how much new/new the chosen epoch may give up (absolute, e.g. 0.02).
        device: where the new model embeds the validation images (default: where it is; a
            model moved elsewhere for this goes back afterwards).
        restore: load the chosen epoch's state when training ends (False: record and plot only,
            e.g. curves on a split that must not select the model).
    """

    def __init__(self, query_loader: Iterable, old_queries: Tensor, *, gallery_loader: Iterable | None = None,
                 old_gallery: Tensor | None = None, metric: str = "precision_at_1",
                 new_new_tolerance: float = 0.02, device: str | torch.device | None = None,
                 restore: bool = True) -> None:
        check_matrix(old_queries, "old_queries")
        if (gallery_loader is None) != (old_gallery is None):
            raise ValueError("gallery_loader, old_gallery: give both or neither")
        if old_gallery is not None:
            check_matrix(old_gallery, "old_gallery")
        if not 0 <= new_new_tolerance <= 1:
            raise ValueError(f"new_new_tolerance: expected a value in [0, 1], got {new_new_tolerance!r}")
        self.query_loader, self.old_queries = query_loader, old_queries.detach().cpu()
        self.gallery_loader = gallery_loader
        self.old_gallery = old_gallery.detach().cpu() if old_gallery is not None else None
        self.metric, self.tolerance, self.device = metric, float(new_new_tolerance), device
        self.restore = restore
        self.history: list[dict] = []
        self._states: dict[int, dict] = {}  # epoch -> model state (CPU), Pareto front only

    def __call__(self, model: nn.Module, epoch: int) -> dict:
        new_q, q_labels = embed(model, self.query_loader, device=self.device)
        if new_q.shape[0] != self.old_queries.shape[0]:
            raise ValueError(f"old_queries: {self.old_queries.shape[0]} rows, but query_loader yields {new_q.shape[0]}")
        kw = {}
        if self.gallery_loader is not None:
            new_g, g_labels = embed(model, self.gallery_loader, device=self.device)
            kw = dict(old_gallery=self.old_gallery, new_gallery=new_g, gallery_labels=g_labels)
        r = cross_test(self.old_queries, new_q, q_labels, metric=self.metric, **kw)
        record = {"epoch": int(epoch), "old_old": r.old_old[self.metric], "new_new": r.new_new[self.metric],
                  "new_old": r.new_old[self.metric], "compatible": r.compatible}
        self.history.append(record)
        self._keep_state(record, model)
        return record

    def _keep_state(self, record: dict, model: nn.Module) -> None:
        """Keep this epoch's state unless another kept epoch is at least as good on both axes;
        drop the kept states this one dominates (they can never be chosen)."""
        by_epoch = {r["epoch"]: r for r in self.history}

        def dominates(a: dict, b: dict) -> bool:  # never chosen over a, whatever the tolerance
            return (a["new_new"] >= b["new_new"] and a["new_old"] >= b["new_old"]
                    and (a["new_new"], a["new_old"]) != (b["new_new"], b["new_old"]))

        if any(dominates(by_epoch[e], record) for e in self._states):
            return
        for e in [e for e in self._states if dominates(record, by_epoch[e])]:
            del self._states[e]
        self._states[record["epoch"]] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    @property
    def chosen(self) -> dict:
        """The record the rule chooses (see :func:`choose_epoch`)."""
        return choose_epoch(self.history, self.tolerance)

    def restore_best(self, model: nn.Module) -> dict:
        """Load the chosen epoch's state into ``model`` (unless ``restore=False``); returns its record."""
        record = self.chosen
        if self.restore:
            model.load_state_dict(copy.deepcopy(self._states[record["epoch"]]))
        return record

    def plot(self, path: str | Path) -> Path:
        """Curves of old/old, new/new and new/old per epoch, the chosen epoch marked (PNG)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
        epochs = [r["epoch"] + 1 for r in self.history]
        for key, label in (("new_new", "new/new"), ("new_old", "new/old (cross-test)"), ("old_old", "old/old")):
            ax.plot(epochs, [100 * r[key] for r in self.history], marker="o", ms=3, label=label)
        ax.axvline(self.chosen["epoch"] + 1, color="gray", ls="--", lw=1,
                   label="the rule's choice" + ("" if self.restore else " (not restored)"))
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_ylabel(self.metric)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_png(fig, path)
