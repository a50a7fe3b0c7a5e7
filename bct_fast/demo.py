"""`bct-fast demo`: the BCT story end to end, offline, in about a minute on a 2-core CPU.

Data: a synthetic class-structured set (class prototypes in a latent space, a fixed random
nonlinear map to the input space, per-sample noise), split by class: the old model sees the
first ``old_classes``, new models see ``train_classes``, retrieval runs on the held-out rest
(open-set, leave-one-out). New models are trained four ways: independently, with L2
regression onto old embeddings, with BCT's influence loss on the old classes only, and with
BCT plus synthesized old-classifier rows for the new classes.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bct_fast import losses
from bct_fast.metrics import evaluate_retrieval


@dataclass
class DemoConfig:
    num_classes: int = 300
    old_classes: int = 100
    train_classes: int = 240
    samples_per_class: int = 24
    latent_dim: int = 24
    input_dim: int = 64
    embed_dim: int = 48
    old_hidden: int = 96
    new_hidden: int = 256
    old_epochs: int = 12
    new_epochs: int = 16
    batch_size: int = 128
    scale: float = 16.0
    influence_weight: float = 1.0
    l2_weight: float = 10.0
    seed: int = 0
    device: str = "cpu"


def make_data(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    protos = torch.randn(cfg.num_classes, cfg.latent_dim, generator=g)
    labels = torch.arange(cfg.num_classes).repeat_interleave(cfg.samples_per_class)
    z = protos[labels] + 0.6 * torch.randn(len(labels), cfg.latent_dim, generator=g)
    a = torch.randn(cfg.input_dim, cfg.latent_dim, generator=g) / cfg.latent_dim ** 0.5
    b = torch.randn(cfg.input_dim, cfg.input_dim, generator=g) / cfg.input_dim ** 0.5
    x = torch.tanh(z @ a.T) @ b.T + 0.05 * torch.randn(len(labels), cfg.input_dim, generator=g)
    return x, labels


def mlp(cfg: DemoConfig, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cfg.input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, cfg.embed_dim))


def batches(x, y, cfg: DemoConfig, gen: torch.Generator):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), cfg.batch_size):
        sel = order[i:i + cfg.batch_size]
        yield x[sel], y[sel]


def train(model: nn.Module, objective, x, y, epochs: int, cfg: DemoConfig, name: str) -> nn.Module:
    """Adam on ``objective(model, inputs, labels)``; the objective's own parameters train too."""
    opt = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    for _ in tqdm(range(epochs), desc=f"train {name}", leave=False):
        for xb, yb in batches(x, y, cfg, gen):
            loss = objective(model, xb.to(cfg.device), yb.to(cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


class Classify(nn.Module):
    """objective(model, x, y) = loss(model(x), y) [+ extra terms]."""

    def __init__(self, loss: nn.Module, l2_to: nn.Module | None = None, l2_weight: float = 0.0):
        super().__init__()
        self.loss, self.l2_weight = loss, l2_weight
        self.l2 = losses.L2CompatibilityLoss()
        # A plain tuple, not a submodule: the frozen old model's parameters must not reach
        # the optimizer through objective.parameters().
        self._old = (l2_to,)

    def forward(self, model, x, y):
        emb = model(x)
        out = self.loss(emb, y)
        if self._old[0] is not None:
            with torch.no_grad():
                old = self._old[0](x)
            out = out + self.l2_weight * self.l2(emb, old)
        return out


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    return torch.cat([model(x[i:i + 1024].to(cfg.device)) for i in range(0, len(x), 1024)]).cpu()


def run_demo(cfg: DemoConfig) -> dict:
    """Train old + four new models, evaluate self/cross retrieval; returns every number."""
    torch.manual_seed(cfg.seed)
    x, y = make_data(cfg)
    old_mask, train_mask = y < cfg.old_classes, y < cfg.train_classes
    test_mask = ~train_mask
    new_loss = lambda: losses.NormSoftmaxLoss(cfg.train_classes, cfg.embed_dim, scale=cfg.scale)  # noqa: E731

    old_head = losses.NormSoftmaxLoss(cfg.old_classes, cfg.embed_dim, scale=cfg.scale)
    old = train(mlp(cfg, cfg.old_hidden).to(cfg.device), Classify(old_head).to(cfg.device),
                x[old_mask], y[old_mask], cfg.old_epochs, cfg, "old")
    old_w = old_head.weight.detach()
    xt, yt = x[train_mask], y[train_mask]
    loader = list(batches(xt, yt, cfg, torch.Generator().manual_seed(2)))
    synth_w = losses.synthesize_classifier(old, loader, old_w, cfg.train_classes, device=cfg.device, progress=False)

    def bct(weight):
        infl = losses.InfluenceLoss(weight, scale=cfg.scale)
        return Classify(losses.BCTLoss(new_loss(), infl, cfg.influence_weight))

    methods = {
        "independent": Classify(new_loss()),
        "l2": Classify(new_loss(), l2_to=old, l2_weight=cfg.l2_weight),
        "bct_old_classes_only": bct(old_w),
        "bct": bct(synth_w),
    }
    xq, yq = x[test_mask], y[test_mask]
    old_emb = embed(old, xq, cfg)
    results = {"config": asdict(cfg), "old/old": evaluate_retrieval(old_emb, yq), "methods": {}}
    for name, objective in methods.items():
        model = train(mlp(cfg, cfg.new_hidden).to(cfg.device), objective.to(cfg.device), xt, yt,
                      cfg.new_epochs, cfg, name)
        new_emb = embed(model, xq, cfg)
        cross = evaluate_retrieval(new_emb, yq, old_emb, yq, exclude_self=True)
        results["methods"][name] = {
            "new/new": evaluate_retrieval(new_emb, yq),
            "new/old": cross,
            "compatible": cross["precision_at_1"] > results["old/old"]["precision_at_1"],
        }
    return results


def format_table(results: dict) -> str:
    oo = results["old/old"]
    lines = [f"{'method':22s} {'old/old':>16s} {'new/new':>16s} {'new/old':>16s}  compatible?",
             f"{'':22s} {'top-1    mAP':>16s} {'top-1    mAP':>16s} {'top-1    mAP':>16s}"]
    fmt = lambda m: f"{100 * m['precision_at_1']:6.1f} {100 * m['mean_average_precision']:6.1f}"  # noqa: E731
    for name, r in results["methods"].items():
        verdict = "yes" if r["compatible"] else "no"
        lines.append(f"{name:22s} {fmt(oo):>16s} {fmt(r['new/new']):>16s} {fmt(r['new/old']):>16s}  {verdict}")
    lines.append("compatible: top-1(new query, old gallery) > top-1(old, old)  (BCT's empirical criterion)")
    return "\n".join(lines)


def save_results(results: dict, out_dir: str) -> str:
    """Write results.json atomically; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    return path
