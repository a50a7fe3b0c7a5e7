"""Command line: ``bct-fast demo`` and ``bct-fast info``."""
from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from bct_fast.demo import DemoConfig, format_table, run_demo, save_results

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bct-fast demo: --device cuda, but no CUDA GPU is visible to PyTorch", file=sys.stderr)
        return 2
    cfg = DemoConfig(device=args.device, seed=args.seed)
    if args.quick:
        cfg = DemoConfig(device=args.device, seed=args.seed, num_classes=120, old_classes=40,
                         train_classes=90, samples_per_class=16, old_epochs=8, new_epochs=10)
    print(f"bct-fast demo: {cfg.num_classes} synthetic classes (old model: {cfg.old_classes}, "
          f"new models: {cfg.train_classes}, retrieval on the {cfg.num_classes - cfg.train_classes} "
          f"held-out classes), device={cfg.device}")
    results = run_demo(cfg)
    print(format_table(results))
    path = save_results(results, args.out)
    print(f"every number: {path}")
    return 0


def _info(_: argparse.Namespace) -> int:
    from bct_fast import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bct-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train old + new models four ways and print the BCT table")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    demo.add_argument("--out", default="bct_fast_out", help="folder for results.json (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="print build_info() as JSON")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
