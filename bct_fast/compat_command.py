"""``bct-fast compat``: cross-model evaluation of your own embedding files.

    bct-fast compat --model old=old_q.npy,old_g.npy --model new=new_q.npy,new_g.npy \\
        --query-labels ql.npy --gallery-labels gl.npy --out compat_out

Models are given oldest first, each as ``NAME=QUERIES[,GALLERY]`` (.npy or .safetensors; a
gallery .npy is memory-mapped and searched by chunks, so millions of rows stay on disk). Without
galleries the query set is its own gallery (leave-one-out). Two models: the cross-test table
(old/old, new/new, new/old), the compatibility verdict M(new, old) > M(old, old) and the update
gain. More models: the lower-triangular compatibility matrix with AC / AM. Both write
``compat.json`` and ``compat.png`` (heatmap) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser", "run", "parse_k"]


def add_parser(sub) -> None:
    p = sub.add_parser("compat", help="cross-model compatibility of your embedding files (old/new, AC/AM)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=QUERIES[,GALLERY]",
                   help="one per model, oldest first (at least two)")
    p.add_argument("--query-labels", required=True)
    p.add_argument("--gallery-labels", help="required when the models have galleries")
    p.add_argument("--metric", default="precision_at_1", help="the verdict's metric (default: %(default)s)")
    p.add_argument("--k", default="auto", help="'auto' (default), 'all' or an integer")
    p.add_argument("--out", default="compat_out", help="folder for compat.json and compat.png")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="skip the heatmap (no matplotlib needed)")
    p.set_defaults(func=run)


def _parse_models(specs: list[str]) -> list[tuple[str, str, str | None]]:
    models = []
    for spec in specs:
        name, sep, files = spec.partition("=")
        parts = files.split(",") if sep else []
        if not name or not sep or not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"--model: expected NAME=QUERIES[,GALLERY], got {spec!r}")
        models.append((name, parts[0], parts[1] if len(parts) == 2 else None))
    names = [m[0] for m in models]
    if len(models) < 2:
        raise ValueError("--model: give at least two models (oldest first)")
    if len(set(names)) != len(names):
        raise ValueError(f"--model: model names must be unique, got {names}")
    if len({m[2] is None for m in models}) != 1:
        raise ValueError("--model: give a gallery for every model or for none")
    return models


def _labels(path: str, what: str):
    import torch

    from bct_fast.embedding_files import load_array

    lab = load_array(path, what)
    if lab.dim() != 1 or lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise ValueError(f"{what}: expected a 1-D integer array, got shape {tuple(lab.shape)} {lab.dtype}")
    return lab.long()


def parse_k(text: str):
    """The ``--k`` option of ``compat`` and ``eval``: 'auto', 'all' or a positive integer."""
    if text in ("auto", "all"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--k: expected 'auto', 'all' or a positive integer, got {text!r}")


def compat(args: argparse.Namespace) -> dict:
    """Evaluate; returns the JSON document (also written to ``args.out``)."""
    # imported here: `bct-fast --help` / `info` stay light (no torch import)
    from bct_fast._core.io import atomic_write, writable_folder
    from bct_fast.embedding_files import load_array
    from bct_fast.evaluate import compatibility_matrix, cross_test

    models = _parse_models(args.model)
    writable_folder(args.out)  # before the searches, not after them
    with_gallery = models[0][2] is not None
    if with_gallery and not args.gallery_labels:
        raise ValueError("--gallery-labels: required when the models have galleries")
    if not with_gallery and args.gallery_labels:
        raise ValueError("--gallery-labels: given, but no model has a gallery (NAME=QUERIES,GALLERY)")
    ql = _labels(args.query_labels, "--query-labels")
    gl = _labels(args.gallery_labels, "--gallery-labels") if with_gallery else None
    queries = {n: load_array(q, f"--model {n} (queries)") for n, q, _ in models}
    galleries = {n: load_array(g, f"--model {n} (gallery)", mmap=True) for n, _, g in models} if with_gallery else None
    for n, q in queries.items():
        if q.dim() != 2 or not q.dtype.is_floating_point or q.shape[0] != ql.shape[0]:
            raise ValueError(f"--model {n} (queries): expected a [{ql.shape[0]}, dim] float array (one row per "
                             f"query label), got {tuple(q.shape)} {q.dtype}")
    for n, g in (galleries or {}).items():
        if g.ndim != 2 or g.shape[0] != gl.shape[0] or g.shape[1] != queries[n].shape[1]:
            raise ValueError(f"--model {n} (gallery): expected [{gl.shape[0]}, {queries[n].shape[1]}] (one row "
                             f"per gallery label, the queries' dim), got {tuple(g.shape)}")
    k = parse_k(args.k)
    names = [m[0] for m in models]
    kw = dict(k=k, progress=not args.no_progress)
    if len(models) == 2:
        old, new = names
        r = cross_test(queries[old], queries[new], ql, metric=args.metric,
                       old_gallery=galleries[old] if galleries else None,
                       new_gallery=galleries[new] if galleries else None, gallery_labels=gl, **kw)
        matrix = r.matrix(old, new)
        text = r.table() + "\n"
        doc = {"models": names, "cross_test": r.to_dict()}
    else:
        matrix = compatibility_matrix(queries, ql, gallery_embeddings=galleries, gallery_labels=gl,
                                      metric=args.metric, lower_only=True, **kw)
        text = matrix.table() + "\n"
        doc = {"models": names, "matrix": matrix.to_dict()}
    doc.update(metric=args.metric, k=k, queries=int(ql.shape[0]),
               gallery_rows=int(gl.shape[0]) if gl is not None else None)
    out = Path(args.out)
    data = json.dumps(doc, indent=2, default=float).encode()
    atomic_write(out / "compat.json", lambda f: f.write(data))
    if not args.no_plot:
        matrix.plot(out / "compat.png")
    print(text + f"wrote {out / 'compat.json'}" + ("" if args.no_plot else f" and {out / 'compat.png'}"))
    return doc


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        compat(args)
    except (ValueError, TypeError) as e:
        print(f"bct-fast compat: {e}", file=sys.stderr)
        return 2
    return 0
