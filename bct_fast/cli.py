"""Command line: ``bct-fast demo``, ``bct-fast eval``, ``bct-fast compat``, ``bct-fast data cjk-setup``,
``bct-fast info``."""
from __future__ import annotations

import argparse
import json
import sys


def _fail(cmd: str, msg: str) -> int:
    print(f"bct-fast {cmd}: {msg}", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    import torch

    from bct_fast.demo import ALL_METHODS, default_config, format_table, quick_config, run_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("demo", "--device cuda, but no CUDA GPU is visible to PyTorch")
    cfg = quick_config(args.dataset) if args.quick else default_config(args.dataset)
    cfg.device, cfg.seed, cfg.protocol = args.device, args.seed, args.protocol
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        cfg.methods = ALL_METHODS if methods == ("all",) else methods
    if args.new_embed_dim is not None:
        cfg.new_embed_dim = args.new_embed_dim
    print(f"bct-fast demo: dataset={cfg.dataset}; old model on {cfg.old_classes} classes, new models on "
          f"{cfg.train_classes}, retrieval on the held-out rest; device={cfg.device}")
    try:
        results = run_demo(cfg, out_dir=args.out, progress=not args.no_progress)
    except ValueError as e:  # e.g. an unknown method: the message names the option
        return _fail("demo", str(e))
    except FileNotFoundError as e:
        return _fail("demo", str(e))
    print(format_table(results))
    print(f"every number: {args.out}/results.json; heatmap: {args.out}/compatibility.png")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from bct_fast.compat_command import parse_k
    from bct_fast.embedding_files import load_array
    from bct_fast.metrics import evaluate_retrieval

    try:
        q = load_array(args.query, "--query")
        ql = load_array(args.query_labels, "--query-labels")
        g = load_array(args.gallery, "--gallery") if args.gallery else None
        gl = load_array(args.gallery_labels, "--gallery-labels") if args.gallery_labels else None
        if (g is None) != (gl is None):
            raise ValueError("--gallery and --gallery-labels: give both or neither")
        if q.dim() != 2 or not q.dtype.is_floating_point:
            raise ValueError(f"--query: expected a 2-D float array, got shape {tuple(q.shape)} {q.dtype}")
        if g is not None and (g.dim() != 2 or g.shape[1] != q.shape[1]):
            raise ValueError(f"--gallery: expected shape [N, {q.shape[1]}], got {tuple(g.shape)}")
        for name, lab, rows in (("--query-labels", ql, q.shape[0]), ("--gallery-labels", gl, None if g is None else g.shape[0])):
            if lab is None:
                continue
            if lab.dim() != 1 or lab.shape[0] != rows or lab.dtype.is_floating_point:
                raise ValueError(f"{name}: expected {rows} integer labels, got shape {tuple(lab.shape)} {lab.dtype}")
        k = parse_k(args.k)
        m = evaluate_retrieval(q, ql.long(), g, gl.long() if gl is not None else None, k=k,
                               recall_at=tuple(args.recall_at), exclude_self=True if args.exclude_self else None)
    except (ValueError, TypeError) as e:
        return _fail("eval", str(e))
    print(json.dumps(m, indent=1))
    return 0


def _data(args: argparse.Namespace) -> int:
    from bct_fast.data import setup_cjk_fonts

    try:
        setup_cjk_fonts(args.cache)
    except (RuntimeError, FileNotFoundError) as e:
        return _fail("data cjk-setup", str(e))
    return 0


def _info(_: argparse.Namespace) -> int:
    from bct_fast import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bct-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train an old model and new models five ways and print the BCT table")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    demo.add_argument("--out", default="bct_fast_out", help="folder for results.json and the heatmap (default: %(default)s)")
    demo.add_argument("--dataset", choices=["glyphs", "cjk", "digits", "synthetic"], default="glyphs",
                      help="glyphs: matplotlib's fonts (default); cjk: needs `bct-fast data cjk-setup` once")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--protocol", choices=["fonts", "families"], default="fonts",
                      help="families: training, query and gallery font families disjoint (out of domain; glyphs)")
    demo.add_argument("--methods", help="comma-separated new-model methods, or 'all' (default: the five of the "
                      "2020 paper's table; more: hoc, hoc_class_means, fct, bct_class_means_projection)")
    demo.add_argument("--new-embed-dim", type=int, help="embedding width of the new models (default: the old one's)")
    demo.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser("eval", help="retrieval metrics for embedding files (.npy / .safetensors)")
    ev.add_argument("--query", required=True)
    ev.add_argument("--query-labels", required=True)
    ev.add_argument("--gallery", help="default: the query set is its own gallery (leave-one-out)")
    ev.add_argument("--gallery-labels")
    ev.add_argument("--k", default="auto", help="'auto' (default), 'all' or an integer")
    ev.add_argument("--recall-at", type=int, nargs="+", default=[1, 5, 10])
    ev.add_argument("--exclude-self", action="store_true",
                    help="gallery row i is query i's image (e.g. a cross-model test on one set)")
    ev.set_defaults(func=_eval)
    data = sub.add_parser("data", help="prepare optional datasets")
    data.add_argument("what", choices=["cjk-setup"])
    data.add_argument("--cache", default=None, help="default: $BCT_FAST_CACHE or ~/.cache/bct_fast")
    data.set_defaults(func=_data)
    from bct_fast.compat_command import add_parser as add_compat_parser

    add_compat_parser(sub)
    info = sub.add_parser("info", help="print build_info() as JSON")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OSError as e:  # an unwritable --out, a file that vanished: the path and why, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args.command, f"{where}{e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
