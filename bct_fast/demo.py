"""`bct-fast demo`: the BCT story end to end, offline, in a few minutes on a 2-core CPU.

Default data: glyphs rendered from matplotlib's fonts (135 character classes x 16 fonts; see
:mod:`bct_fast.data`). Classes are split at random: the OLD model trains on ``old_classes``
of them, NEW models on ``train_classes`` (a superset), and retrieval runs on the held-out rest
(open-set, leave-one-out: each query's own image is excluded from every gallery). The new model
is wider and sees more classes, so it should be better; it is trained four ways:

- ``independent``: no compatibility constraint (cross-test should be near chance);
- ``l2``: + L2 regression onto the old embeddings (the paper's failing baseline);
- ``bct_old_classes_only``: + influence loss through the old classifier, new classes ignored;
- ``bct``: + influence loss with synthesized old-classifier rows for the new classes.

Printed: the paper's table (old/old, new/new, new/old top-1 and mAP, compatibility verdict).
Saved: ``results.json`` (every number) and ``compatibility.png`` (heatmap).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from bct_fast import data as datasets
from bct_fast import train
from bct_fast._io import atomic_write
from bct_fast.evaluate import CompatibilityMatrix, cross_test

DATASETS = ("glyphs", "cjk", "digits", "synthetic")


@dataclass
class DemoConfig:
    dataset: str = "glyphs"
    image_size: int = 24
    augment: int = 1            # jittered training copies per (class, font)
    old_classes: int = 40
    train_classes: int = 90     # the rest is held out for retrieval
    embed_dim: int = 64
    old_width: int = 8          # the old model is narrower and sees fewer classes
    new_width: int = 32
    old_epochs: int = 10
    new_epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    scale: float = 16.0
    influence_weight: float = 1.0
    l2_weight: float = 1.0
    seed: int = 0
    device: str = "cpu"
    cjk_max_classes: int | None = 1500
    split_by_font: bool = True  # glyphs: queries from some font families, gallery from the others


class ConvEmbedder(nn.Module):
    """A small CNN: 3 conv blocks (width, 2w, 4w), global average pool, linear embedding."""

    def __init__(self, width: int, embed_dim: int, in_channels: int = 1):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))
        self.features = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width),
                                      nn.MaxPool2d(2), block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4 * width, embed_dim)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class MLPEmbedder(nn.Module):
    def __init__(self, width: int, embed_dim: int, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 8 * width), nn.ReLU(), nn.Linear(8 * width, 8 * width),
                                 nn.ReLU(), nn.Linear(8 * width, embed_dim))

    def forward(self, x):
        return self.net(x.flatten(1))


def load_data(cfg: DemoConfig):
    """(train inputs, train labels, eval inputs, eval labels, eval is-query mask, model factory).

    The eval set holds the clean images of the held-out classes. With ``split_by_font`` (glyph
    data) the queries are the renderings in every third font family and the gallery the rest,
    so near-identical sibling fonts (regular / bold of one family) cannot make retrieval
    trivial; otherwise the eval set is its own gallery (leave-one-out)."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {cfg.dataset!r}")
    if cfg.dataset in ("glyphs", "cjk"):
        load = datasets.glyph_dataset if cfg.dataset == "glyphs" else datasets.cjk_glyph_dataset
        kw = {} if cfg.dataset == "glyphs" else {"max_classes": cfg.cjk_max_classes}
        x, y, font, names = load(cfg.image_size, augment=cfg.augment, seed=cfg.seed, **kw)
        clean = torch.ones(len(y), dtype=torch.bool)
        clean[torch.arange(len(y)) % (cfg.augment + 1) != 0] = False  # first of each group is clean
        factory = lambda w: ConvEmbedder(w, cfg.embed_dim)  # noqa: E731
        if cfg.dataset == "glyphs":  # fonts sorted by file name: 4 styles per family; Serif = queries
            query_font = (font // 4) == 2
        else:                         # CJK: every fourth font design
            query_font = font % 4 == 3
        is_query = query_font if cfg.split_by_font else None
    elif cfg.dataset == "digits":
        x, y, names = datasets.digits_dataset()
        clean = torch.ones(len(y), dtype=torch.bool)
        is_query = None
        factory = lambda w: MLPEmbedder(w, cfg.embed_dim, x[0].numel())  # noqa: E731
    else:
        x, y, names = datasets.synthetic_dataset(seed=cfg.seed)
        clean = torch.ones(len(y), dtype=torch.bool)
        is_query = None
        factory = lambda w: MLPEmbedder(w, cfg.embed_dim, x.shape[1])  # noqa: E731
    n_classes = len(names)
    if not 0 < cfg.old_classes <= cfg.train_classes < n_classes:
        raise ValueError(f"old_classes/train_classes: need 0 < old ({cfg.old_classes}) <= train "
                         f"({cfg.train_classes}) < number of classes ({n_classes})")
    # Random class split; relabel so that old classes are 0..old-1 and training classes 0..train-1.
    perm = torch.randperm(n_classes, generator=torch.Generator().manual_seed(cfg.seed))
    new_label = torch.empty_like(perm)
    new_label[perm] = torch.arange(n_classes)
    y = new_label[y]
    train_mask = y < cfg.train_classes
    eval_mask = ~train_mask & clean
    q = is_query[eval_mask] if is_query is not None else None
    return x[train_mask], y[train_mask], x[eval_mask], y[eval_mask], q, factory


def _loader(x, y, batch_size, shuffle):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def run_demo(cfg: DemoConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train the old model and four new ones, evaluate self/cross retrieval; every number."""
    torch.manual_seed(cfg.seed)
    xt, yt, xq, yq, is_query, factory = load_data(cfg)
    old_mask = yt < cfg.old_classes
    fit_kw = dict(lr=cfg.lr, device=cfg.device, seed=cfg.seed, progress=progress)
    old_loader = _loader(xt[old_mask], yt[old_mask], cfg.batch_size, True)
    new_loader = _loader(xt, yt, cfg.batch_size, True)
    query_loader = _loader(xq, yq, 512, False)

    old, old_loss = train.train_independent(factory(cfg.old_width), old_loader, cfg.old_classes, cfg.embed_dim,
                                            cfg.old_epochs, scale=cfg.scale, desc="old model", **fit_kw)
    old_w = old_loss.weight.detach()
    old_q, _ = train.embed(old, query_loader, device=cfg.device)

    def new_model():
        torch.manual_seed(cfg.seed + 1)  # every method starts from the same initialization
        return factory(cfg.new_width)

    common = (new_loader, cfg.train_classes, cfg.embed_dim, cfg.new_epochs)
    methods = {
        "independent": lambda: train.train_independent(new_model(), *common, scale=cfg.scale, desc="independent", **fit_kw),
        "l2": lambda: train.train_l2(new_model(), old, *common, l2_weight=cfg.l2_weight, scale=cfg.scale,
                                     desc="l2", **fit_kw),
        "bct_old_classes_only": lambda: train.train_bct(new_model(), old, old_w, *common, synthesize=False,
                                                        influence_weight=cfg.influence_weight, scale=cfg.scale,
                                                        desc="bct (old classes)", **fit_kw),
        "bct": lambda: train.train_bct(new_model(), old, old_w, *common, synthesize=True,
                                       influence_weight=cfg.influence_weight, scale=cfg.scale, desc="bct", **fit_kw),
    }
    results: dict = {"config": asdict(cfg), "eval_images": int(len(yq)), "eval_classes": int(yq.unique().numel()),
                     "queries": int(len(yq) if is_query is None else is_query.sum()), "methods": {}}
    embeddings = {"old": old_q}
    for name, run in methods.items():
        model, _ = run()
        new_q, _ = train.embed(model, query_loader, device=cfg.device)
        embeddings[name] = new_q
        if is_query is None:
            r = cross_test(old_q, new_q, yq, k="all")
        else:
            g = ~is_query
            r = cross_test(old_q[is_query], new_q[is_query], yq[is_query], old_gallery=old_q[g],
                           new_gallery=new_q[g], gallery_labels=yq[g], k="all")
        results["old/old"] = r.old_old
        results["methods"][name] = {"new/new": r.new_new, "new/old": r.new_old, "compatible": r.compatible,
                                    "update_gain": r.update_gain}
    # Heatmap: each new model as query against the old gallery and itself.
    names = list(embeddings)
    grid = [[None] * len(names) for _ in names]
    grid[0][0] = results["old/old"]["precision_at_1"]
    for i, n in enumerate(names[1:], 1):
        grid[i][0] = results["methods"][n]["new/old"]["precision_at_1"]
        grid[i][i] = results["methods"][n]["new/new"]["precision_at_1"]
    results["matrix"] = CompatibilityMatrix(names, grid, "precision_at_1").values
    if out_dir is not None:
        save_results(results, out_dir)
        _plot(names, grid, Path(out_dir) / "compatibility.png")
    return results


def _plot(names, grid, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[np.nan if v is None else 100 * v for v in row] for row in grid])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=100)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(vals[i, j]):
                mark = "" if j != 0 or i == 0 else (" ✓" if vals[i, 0] > vals[0, 0] else " ✗")
                ax.text(j, i, f"{vals[i, j]:.1f}{mark}", ha="center", va="center",
                        color="white" if vals[i, j] < 60 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), ["old"] + ["itself"] * (len(names) - 1), fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("gallery model (column 0: the OLD gallery; diagonal: self-test)")
    ax.set_ylabel("query model")
    ax.set_title("top-1 retrieval on held-out classes (✓: beats old/old)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


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


def save_results(results: dict, out_dir: str | Path) -> Path:
    """Write results.json atomically; returns its path."""
    data = json.dumps(results, indent=1).encode()
    return atomic_write(Path(out_dir) / "results.json", lambda f: f.write(data))


def quick_config(dataset: str = "glyphs") -> DemoConfig:
    """A small, fast configuration (CI smoke tests): fewer epochs, smaller images / models."""
    if dataset == "digits":
        return DemoConfig(dataset="digits", old_classes=3, train_classes=7, embed_dim=32, old_width=4,
                          new_width=16, old_epochs=4, new_epochs=6, batch_size=64, lr=3e-3)
    return DemoConfig(dataset=dataset, image_size=24, augment=1, old_epochs=3, new_epochs=4, old_width=8,
                      new_width=16)
