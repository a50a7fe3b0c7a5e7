"""`bct-fast demo`: the BCT story end to end, offline, in a few minutes on a 2-core CPU.

Default data: glyphs rendered from matplotlib's fonts (135 character classes x 16 fonts; see
:mod:`bct_fast.data`). Classes are split at random: the OLD model trains on ``old_classes``
of them, NEW models on ``train_classes`` (a superset), and retrieval runs on the held-out rest
(open-set, leave-one-out: each query's own image is excluded from every gallery). The new model
is wider and sees more classes, so it should be better; it is trained five ways:

- ``independent``: no compatibility constraint (cross-test should be near chance);
- ``l2``: + L2 regression onto the old embeddings (the paper's failing baseline);
- ``bct_old_classes_only``: + influence loss through the old classifier, new classes ignored;
- ``bct``: + influence loss with synthesized old-classifier rows for the new classes (the paper);
- ``bct_class_means``: + influence loss through the old model's class-mean embeddings for every
  class instead of its learned classifier rows (BT-2's and MixBCT's BCT baseline).

Methods beyond the 2020 recipe (``DemoConfig.methods``, ``bct-fast demo --methods ...``; the
out-of-domain comparison in ``benchmarks/compat_methods_ood.py`` runs them all):

- ``hoc``: + a new-to-old contrastive term over each batch (HOC, CVPR 2024);
- ``hoc_class_means``: ``hoc`` + the class-mean influence term;
- ``fct``: the independent new model, and the OLD gallery upgraded by a learned transformation of
  its stored embeddings (FCT, CVPR 2022; no image is re-embedded), see
  :mod:`bct_fast.transformation`;
- ``bct_class_means_projection``: class-mean BCT whose cross term goes through a learned linear
  projection instead of the first d_old entries (differs from ``bct_class_means`` only when
  ``new_embed_dim`` > ``embed_dim``).

Printed: the paper's table (old/old, new/new, new/old top-1 and mAP, compatibility verdict),
then a ``bct-fast compat`` command that reproduces one method's cross-test from the saved files.
Saved: ``results.json`` (every number, and that command), ``compatibility.png`` (heatmap) and
``embeddings/<set>/`` (every model's embeddings of each evaluation set as ``.npy``, see
:func:`save_embeddings`).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bct_fast import data as datasets
from bct_fast import train
from bct_fast import transformation as fct
from bct_fast._core.io import atomic_write, writable_folder
from bct_fast.compat_monitor import CompatibilityValidator
from bct_fast.evaluate import CompatibilityMatrix, CrossTestResult, cross_test, pyplot, save_png
from bct_fast.losses import match_dim

DATASETS = ("glyphs", "cjk", "digits", "synthetic")
EXAMPLE_METHOD = "bct_class_means"  # the method whose `bct-fast compat` command is printed
DEFAULT_METHODS = ("independent", "l2", "bct_old_classes_only", "bct", "bct_class_means")
ALL_METHODS = DEFAULT_METHODS + ("hoc", "hoc_class_means", "fct", "bct_class_means_projection")


@dataclass
class DemoConfig:
    dataset: str = "glyphs"
    image_size: int = 24
    augment: int = 1            # jittered training copies per (class, font)
    old_classes: int = 40
    train_classes: int = 90     # the rest is held out for retrieval
    embed_dim: int = 64           # the old model's embedding width
    new_embed_dim: int | None = None  # the new models' (None: embed_dim)
    old_width: int = 8          # the old model is narrower and sees fewer classes
    new_width: int = 32
    old_epochs: int = 10
    new_epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    scale: float = 16.0
    influence_weight: float = 1.0
    l2_weight: float = 1.0
    seed: int = 0
    device: str = "cpu"
    cjk_max_classes: int | None = 1500
    split_by_font: bool = True  # glyphs: queries from some font families, gallery from the others
    # "fonts": train on every family, evaluate on held-out styles (the sibling-font protocol);
    # "families" (glyphs): train, query and gallery font families disjoint (out of domain),
    # rotated by seed. See load_data.
    protocol: str = "fonts"
    methods: tuple = DEFAULT_METHODS  # which new models to train (ALL_METHODS)
    contrastive_weight: float = 1.0   # hoc*: weight of the new-to-old InfoNCE
    temperature: float = 0.05         # hoc*: its temperature
    transformation_epochs: int = 30   # fct: passes over the training embeddings


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


@dataclass
class DemoData:
    """Training images, and the two evaluation sets (each: inputs, labels, is-query mask or None
    for leave-one-out within the set)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_sets: dict
    factory: object


def load_data(cfg: DemoConfig, progress: bool = False) -> DemoData:
    """Split the data by class AND by image.

    - ``open_set``: clean images of the held-out classes (no model trained on them). With
      ``split_by_font`` (glyphs) the DejaVu Serif renderings are the queries and the other fonts
      the gallery, so sibling fonts (regular / bold of one family) cannot make it trivial.
    - ``closed_set``: held-out images of the TRAINING classes (one font per family, or every
      fourth sample, never trained on), leave-one-out: the protocol of the paper's ImageNet
      runs (validation images of the training classes).

    ``protocol="families"`` (out of domain): matplotlib's 16 fonts are 4 families of 4
    styles. One family renders the queries, another the gallery, the other two the training
    images (families rotated by seed), so no model ever sees a style of the query or gallery
    family (cjk: the distinct designs are dealt into 4 groups the same way): ``closed_set`` = the training classes, ``open_set`` = the held-out classes, both
    queried across the two unseen families.
    """
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {cfg.dataset!r}")
    if cfg.protocol not in ("fonts", "families"):
        raise ValueError(f"protocol: expected 'fonts' or 'families', got {cfg.protocol!r}")
    if cfg.dataset in ("glyphs", "cjk"):
        load = datasets.glyph_dataset if cfg.dataset == "glyphs" else datasets.cjk_glyph_dataset
        kw = {} if cfg.dataset == "glyphs" else {"max_classes": cfg.cjk_max_classes}
        x, y, font, names = load(cfg.image_size, augment=cfg.augment, seed=cfg.seed, progress=progress, **kw)
        clean = torch.arange(len(y)) % (cfg.augment + 1) == 0  # first of each group is clean
        factory = lambda w, dim: ConvEmbedder(w, dim)  # noqa: E731
        held_out_image = font % 4 == 3  # one style per family (glyphs), every 4th design (CJK)
        if cfg.dataset == "glyphs":    # fonts sorted by file name: 4 styles per family; Serif = queries
            query_font = (font // 4) == 2
        else:
            query_font = font % 4 == 2
        is_query = query_font if cfg.split_by_font else None
        if cfg.protocol == "families":
            # glyphs: matplotlib's 4 families of 4 styles; cjk: the distinct designs dealt into
            # 4 groups by index (no two groups share a design; designs are already distinct).
            family = font // 4 if cfg.dataset == "glyphs" else font % 4
            q_family, g_family = (2 + cfg.seed) % 4, (3 + cfg.seed) % 4
            held_out_image = (family == q_family) | (family == g_family)  # never trained on
            is_query = family == q_family
    else:
        if cfg.dataset == "digits":
            x, y, names = datasets.digits_dataset()
        else:
            x, y, names = datasets.synthetic_dataset(seed=cfg.seed)
        clean = torch.ones(len(y), dtype=torch.bool)
        held_out_image = torch.arange(len(y)) % 4 == 3
        is_query = None
        in_dim = x[0].numel()
        factory = lambda w, dim: MLPEmbedder(w, dim, in_dim)  # noqa: E731
    n_classes = len(names)
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown or not cfg.methods:
        raise ValueError(f"methods: expected a non-empty subset of {list(ALL_METHODS)}, got {list(cfg.methods)!r}")
    if cfg.new_embed_dim is not None and cfg.new_embed_dim < 1:
        raise ValueError(f"new_embed_dim: expected a positive integer or None, got {cfg.new_embed_dim!r}")
    if not 0 < cfg.old_classes <= cfg.train_classes < n_classes:
        raise ValueError(f"old_classes/train_classes: need 0 < old ({cfg.old_classes}) <= train "
                         f"({cfg.train_classes}) < number of classes ({n_classes})")
    # Random class split; relabel so that old classes are 0..old-1 and training classes 0..train-1.
    perm = torch.randperm(n_classes, generator=torch.Generator().manual_seed(cfg.seed))
    new_label = torch.empty_like(perm)
    new_label[perm] = torch.arange(n_classes)
    y = new_label[y]
    train_class = y < cfg.train_classes
    train_mask = train_class & ~held_out_image
    if cfg.protocol == "families":  # both sets: unseen query family against unseen gallery family
        open_mask = ~train_class & clean & held_out_image
        closed_mask = train_class & clean & held_out_image
        eval_sets = {"open_set": (x[open_mask], y[open_mask], is_query[open_mask]),
                     "closed_set": (x[closed_mask], y[closed_mask], is_query[closed_mask])}
        return DemoData(x[train_mask], y[train_mask], eval_sets, factory)
    open_mask = ~train_class & clean
    closed_mask = train_class & held_out_image & clean
    eval_sets = {
        "open_set": (x[open_mask], y[open_mask], is_query[open_mask] if is_query is not None else None),
        "closed_set": (x[closed_mask], y[closed_mask], None),
    }
    return DemoData(x[train_mask], y[train_mask], eval_sets, factory)


def _loader(x, y, batch_size, shuffle):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


@dataclass
class Upgrade:
    """A trained new model and how it meets the OLD gallery: ``query_map`` takes its embeddings
    to the space compared with the old gallery (identity, a slice, a learned projection);
    ``gallery_map`` rewrites the stored old embeddings (identity, or FCT's transformation)."""
    model: nn.Module
    query_map: object
    gallery_map: object
    info: dict


def _query_map(objective: nn.Module, old_dim: int):
    """How an objective's new embeddings are compared with old ones (no grad)."""
    to_old = getattr(objective, "to_old_space", None) or getattr(getattr(objective, "influence_loss", None),
                                                                 "to_old_space", None)
    if to_old is None:
        return lambda e: match_dim(e, old_dim)

    def mapped(e: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_old(e).float()
    return mapped


def _same(e: torch.Tensor) -> torch.Tensor:
    return e


def run_demo(cfg: DemoConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train the old model and the new ones of ``cfg.methods``; evaluate self/cross retrieval on
    the open-set and closed-set evaluation sets (see :func:`load_data`). Returns every number."""
    if out_dir is not None:
        writable_folder(out_dir)  # before the training, not after it
    torch.manual_seed(cfg.seed)
    d = load_data(cfg, progress)
    xt, yt, factory = d.train_x, d.train_y, d.factory
    new_dim = cfg.new_embed_dim or cfg.embed_dim
    old_mask = yt < cfg.old_classes
    fit_kw = dict(lr=cfg.lr, device=cfg.device, seed=cfg.seed, progress=progress)
    old_loader = _loader(xt[old_mask], yt[old_mask], cfg.batch_size, True)
    new_loader = _loader(xt, yt, cfg.batch_size, True)

    old, old_loss = train.train_independent(factory(cfg.old_width, cfg.embed_dim), old_loader, cfg.old_classes,
                                            cfg.embed_dim, cfg.old_epochs, scale=cfg.scale, desc="old model",
                                            **fit_kw)
    old_w = old_loss.weight.detach()
    geometry = old_classifier_geometry(old, old_w, _loader(xt[old_mask], yt[old_mask], 512, False), cfg.device)

    def new_model():
        torch.manual_seed(cfg.seed + 1)  # every method starts from the same initialization
        return factory(cfg.new_width, new_dim)

    common = (new_loader, cfg.train_classes, new_dim, cfg.new_epochs)
    bct_kw = dict(influence_weight=cfg.influence_weight, scale=cfg.scale)
    hoc_kw = dict(contrastive_weight=cfg.contrastive_weight, temperature=cfg.temperature, scale=cfg.scale)
    trained: dict = {}

    def independent():
        if "independent" not in trained:
            trained["independent"] = train.train_independent(new_model(), *common, scale=cfg.scale,
                                                             desc="independent", **fit_kw)
        return trained["independent"]

    def upgrade(pair, **info) -> Upgrade:
        model, objective = pair
        return Upgrade(model, _query_map(objective, cfg.embed_dim), _same, info)

    def fct_upgrade() -> Upgrade:
        model, loss = independent()
        h = fct.EmbeddingTransformation(cfg.embed_dim, new_dim)
        fct.train_transformation(h, old, model, loss.weight, _loader(xt, yt, 512, False), cfg.transformation_epochs,
                                 scale=cfg.scale, lr=cfg.lr, device=cfg.device, seed=cfg.seed, progress=progress)
        cost = fct.transformation_cost(h, model, xt[:1])
        return Upgrade(model, _same, lambda e: fct.upgrade_gallery(h, e), {"cost_per_item": cost})

    runners = {
        "independent": lambda: upgrade(independent()),
        "l2": lambda: upgrade(train.train_l2(new_model(), old, *common, l2_weight=cfg.l2_weight, scale=cfg.scale,
                                             desc="l2", **fit_kw)),
        "bct_old_classes_only": lambda: upgrade(train.train_bct(new_model(), old, old_w, *common, synthesize=False,
                                                                desc="bct (old classes)", **bct_kw, **fit_kw)),
        "bct": lambda: upgrade(train.train_bct(new_model(), old, old_w, *common, synthesize=True, desc="bct",
                                               **bct_kw, **fit_kw)),
        "bct_class_means": lambda: upgrade(train.train_bct(new_model(), old, None, *common, class_means=True,
                                                           desc="bct (class means)",
                                                           validate=curves if new_dim == cfg.embed_dim else None,
                                                           **bct_kw, **fit_kw)),
        "bct_class_means_projection": lambda: upgrade(train.train_bct(
            new_model(), old, None, *common, class_means=True, projection="learned",
            desc="bct (class means, projection)", **bct_kw, **fit_kw)),
        "hoc": lambda: upgrade(train.train_contrastive(new_model(), old, *common, desc="hoc", **hoc_kw, **fit_kw)),
        "hoc_class_means": lambda: upgrade(train.train_contrastive(
            new_model(), old, *common, influence_weight=cfg.influence_weight, desc="hoc (class means)",
            **hoc_kw, **fit_kw)),
        "fct": fct_upgrade,
    }
    results: dict = {"config": asdict(cfg), "train_images": int(len(yt)), "old_classifier_geometry": geometry}
    old_emb = {}
    embeddings: dict = {set_name: {} for set_name in d.eval_sets}  # set -> model -> [n, dim], saved below
    for set_name, (xe, ye, is_query) in d.eval_sets.items():
        old_emb[set_name], _ = train.embed(old, _loader(xe, ye, 512, False), device=cfg.device)
        embeddings[set_name]["old"] = old_emb[set_name]
        results[set_name] = {"images": int(len(ye)), "classes": int(ye.unique().numel()),
                             "queries": int(len(ye) if is_query is None else is_query.sum()), "methods": {}}
    curves = _curve_recorder(d.eval_sets["closed_set"], old_emb["closed_set"], cfg)
    for name in cfg.methods:
        up = runners[name]()
        for set_name, (xe, ye, is_query) in d.eval_sets.items():
            new_e, _ = train.embed(up.model, _loader(xe, ye, 512, False), device=cfg.device)
            embeddings[set_name][name] = new_e
            r = _cross_test(old_emb[set_name], new_e, ye, is_query, up)
            res = results[set_name]
            res["old/old"] = r.old_old
            res["methods"][name] = {"new/new": r.new_new, "new/old": r.new_old, "compatible": r.compatible,
                                    "compatible_map": r.new_old["mean_average_precision"] > r.old_old["mean_average_precision"],
                                    "update_gain": r.update_gain, **up.info}
    if curves.history:
        results["training_curves"] = {EXAMPLE_METHOD: {"set": "closed_set", "metric": curves.metric,
                                                       "epochs": curves.history}}
    if out_dir is not None:
        if curves.history:
            curves.plot(Path(out_dir) / f"curves_{EXAMPLE_METHOD}.png")
        files = save_embeddings(embeddings, d.eval_sets, out_dir)
        results["embeddings"] = files
        if EXAMPLE_METHOD in cfg.methods and new_dim == cfg.embed_dim:
            results["compat_commands"] = {s: compat_command(f, EXAMPLE_METHOD, Path(out_dir) / f"compat_{s}")
                                          for s, f in files.items()}
        save_results(results, out_dir)
        _plot(results, Path(out_dir) / "compatibility.png")
    return results


def _cross_test(old_e: torch.Tensor, new_e: torch.Tensor, labels: torch.Tensor, is_query, up: Upgrade
                ) -> CrossTestResult:
    """Old/old, new/new and new/old (the upgrade's maps applied) on one evaluation set:
    leave-one-out when there is no query mask."""
    if is_query is None:
        return cross_test(old_e, new_e, labels, k="all", query_map=up.query_map, gallery_map=up.gallery_map)
    g = ~is_query
    return cross_test(old_e[is_query], new_e[is_query], labels[is_query], old_gallery=old_e[g],
                      new_gallery=new_e[g], gallery_labels=labels[g], k="all", query_map=up.query_map,
                      gallery_map=up.gallery_map)


def _curve_recorder(eval_set, old_e: torch.Tensor, cfg: DemoConfig) -> CompatibilityValidator:
    """Old/old, new/new and new/old on the closed set after every epoch of one method, for the
    curves plot (``restore=False``: the evaluation set only watches, it never selects a model)."""
    xe, ye, is_query = eval_set
    if is_query is None:
        return CompatibilityValidator([(xe, ye)], old_e, device=cfg.device, restore=False)
    g = ~is_query
    return CompatibilityValidator([(xe[is_query], ye[is_query])], old_e[is_query],
                                  gallery_loader=[(xe[g], ye[g])], old_gallery=old_e[g],
                                  device=cfg.device, restore=False)


@torch.no_grad()
def old_classifier_geometry(old_model: nn.Module, old_weight: torch.Tensor, loader, device: str = "cpu") -> dict:
    """Where the old model's training embeddings sit relative to its learned classifier rows and
    to their class means (mean cosines). The influence loss pulls new embeddings toward the
    rows it is given; cross-model retrieval rewards landing where the old embeddings are."""
    from bct_fast.losses import class_mean_classifier

    w = nn.functional.normalize(old_weight.float().to(device), dim=1)
    means = class_mean_classifier(old_model, loader, w.shape[0], device=device, progress=False)
    emb, labels = train.embed(old_model, loader, device=device)
    emb, labels = nn.functional.normalize(emb.float().to(device), dim=1), labels.to(device)
    return {"cos_row_to_class_mean": float((w * means).sum(1).mean()),
            "cos_embedding_to_own_row": float((emb * w[labels]).sum(1).mean()),
            "cos_embedding_to_own_class_mean": float((emb * means[labels]).sum(1).mean())}


def _plot(results: dict, path: Path) -> Path:
    """One heatmap per evaluation set (top-1): rows = query model, column 0 = the OLD gallery,
    diagonal = self-test, other pairs not evaluated."""
    sets = [s for s in ("closed_set", "open_set") if s in results]
    fig, axes = pyplot().subplots(1, len(sets), figsize=(6.2 * len(sets), 4.8), dpi=110, squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        res = results[set_name]
        names = ["old"] + list(res["methods"])
        grid = [[None] * len(names) for _ in names]
        grid[0][0] = res["old/old"]["precision_at_1"]
        for i, n in enumerate(names[1:], 1):
            grid[i][0] = res["methods"][n]["new/old"]["precision_at_1"]
            grid[i][i] = res["methods"][n]["new/new"]["precision_at_1"]
        im = CompatibilityMatrix(names, grid, "precision_at_1").draw(
            ax, title=f"{set_name.replace('_', '-')}: top-1 (column 0: the OLD gallery)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_png(fig, path)


def format_table(results: dict) -> str:
    """The paper's table, once per evaluation set."""
    fmt = lambda m: f"{100 * m['precision_at_1']:6.1f} {100 * m['mean_average_precision']:6.1f}"  # noqa: E731
    lines = []
    titles = {"closed_set": "closed-set: unseen images of the training classes (the paper's ImageNet protocol)",
              "open_set": "open-set: held-out classes"}
    if results.get("config", {}).get("protocol") == "families":
        titles = {"closed_set": "closed-set, out of domain: the training classes, queries and gallery from two "
                                "font families no model saw",
                  "open_set": "open-set, out of domain: held-out classes, the same two unseen families"}
    for set_name in ("closed_set", "open_set"):
        if set_name not in results:
            continue
        res = results[set_name]
        oo = res["old/old"]
        lines += [f"{titles[set_name]} ({res['images']} images, {res['classes']} classes)",
                  f"{'method':28s} {'old/old':>16s} {'new/new':>16s} {'new/old':>16s}  compatible? (top-1, mAP)",
                  f"{'':28s} {'top-1    mAP':>16s} {'top-1    mAP':>16s} {'top-1    mAP':>16s}"]
        for name, r in res["methods"].items():
            verdict = f"{'yes' if r['compatible'] else 'no':>3s}, {'yes' if r['compatible_map'] else 'no'}"
            lines.append(f"{name:28s} {fmt(oo):>16s} {fmt(r['new/new']):>16s} {fmt(r['new/old']):>16s}  {verdict}")
        lines.append("")
    geo = results.get("old_classifier_geometry")
    if geo:
        lines.append("old model, training images: mean cos(embedding, own classifier row) = "
                     f"{geo['cos_embedding_to_own_row']:.2f}, cos(embedding, own class mean) = "
                     f"{geo['cos_embedding_to_own_class_mean']:.2f}, cos(row, class mean) = "
                     f"{geo['cos_row_to_class_mean']:.2f}")
    lines.append("compatible: M(new query, old gallery) > M(old, old)  (BCT's empirical criterion)")
    for set_name, cmd in results.get("compat_commands", {}).items():
        lines += ["", f"{EXAMPLE_METHOD}'s {set_name.replace('_', '-')} cross-test again, from the saved embeddings:",
                  f"  {cmd}"]
    return "\n".join(lines)


def _save_npy(path: Path, t: torch.Tensor) -> str:
    """Write one tensor as ``.npy`` atomically; returns the path as text."""
    arr = t.detach().cpu().numpy()
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    return str(path)


def save_embeddings(embeddings: dict, eval_sets: dict, out_dir: str | Path) -> dict:
    """Write ``embeddings/<set>/<model>_queries.npy`` (and ``<model>_gallery.npy``) plus the labels,
    split exactly as the demo evaluates the set: with a query mask the queries and the gallery
    are separate files; without one (leave-one-out) the query file is its own gallery, which is
    what ``bct-fast compat`` does when a model has no gallery file.

    Returns ``{set: {"query_labels": path, ["gallery_labels": path,] "models": {model:
    {"queries": path, ["gallery": path]}}}}``."""
    files = {}
    for set_name, (_, labels, is_query) in eval_sets.items():
        folder = Path(out_dir) / "embeddings" / set_name
        parts = {"queries": slice(None)} if is_query is None else {"queries": is_query, "gallery": ~is_query}
        entry: dict = {"models": {}}
        for part, rows in parts.items():
            key = "query_labels" if part == "queries" else "gallery_labels"
            entry[key] = _save_npy(folder / f"{key}.npy", labels[rows])
        for model, emb in embeddings[set_name].items():
            entry["models"][model] = {part: _save_npy(folder / f"{model}_{part}.npy", emb[rows])
                                      for part, rows in parts.items()}
        files[set_name] = entry
    return files


def compat_command(set_files: dict, method: str, out: str | Path) -> str:
    """The ``bct-fast compat`` command that recomputes ``method``'s cross-test against the old
    model from the files of one evaluation set (``k=all``, as the demo evaluates)."""
    def spec(model: str) -> str:
        paths = set_files["models"][model]
        return f"{model}=" + ",".join(paths[p] for p in ("queries", "gallery") if p in paths)

    args = ["bct-fast", "compat", "--model", spec("old"), "--model", spec(method),
            "--query-labels", set_files["query_labels"]]
    if "gallery_labels" in set_files:
        args += ["--gallery-labels", set_files["gallery_labels"]]
    return shlex.join(args + ["--k", "all", "--out", str(out)])


def save_results(results: dict, out_dir: str | Path) -> Path:
    """Write results.json atomically; returns its path."""
    data = json.dumps(results, indent=1).encode()
    return atomic_write(Path(out_dir) / "results.json", lambda f: f.write(data))


def default_config(dataset: str = "glyphs") -> DemoConfig:
    """The ``bct-fast demo`` configuration. ``cjk`` is the realistic-size run: the old model on
    300 classes, the new ones on 1,200, retrieval on the other 383 classes (16 distinct font
    designs; about 52 minutes on a 2-core CPU, see the README)."""
    if dataset == "cjk":
        return DemoConfig(dataset="cjk", image_size=32, augment=1, old_classes=300, train_classes=1200,
                          embed_dim=128, old_width=16, new_width=32, old_epochs=8, new_epochs=16,
                          batch_size=256, lr=2e-3, scale=30.0, cjk_max_classes=None)
    return DemoConfig(dataset=dataset)


def quick_config(dataset: str = "glyphs") -> DemoConfig:
    """A small, fast configuration (CI smoke tests): fewer epochs, smaller images / models."""
    if dataset == "digits":
        return DemoConfig(dataset="digits", old_classes=3, train_classes=7, embed_dim=32, old_width=4,
                          new_width=16, old_epochs=4, new_epochs=6, batch_size=64, lr=3e-3)
    return DemoConfig(dataset=dataset, image_size=24, augment=1, old_epochs=3, new_epochs=4, old_width=8,
                      new_width=16)
