"""Every compatibility method side by side on the out-of-domain protocol, several seeds.

    python benchmarks/compat_methods_ood.py --out /tmp/ood --seeds 0 1 2 [--new-embed-dim 64 128]
    python benchmarks/compat_methods_ood.py --dataset cjk --out /tmp/ood_cjk --methods ...

Runs ``bct-fast demo --protocol families`` (training, query and gallery font families disjoint,
rotated by seed; CJK: the distinct designs dealt into 4 groups) with every method of
:data:`bct_fast.demo.ALL_METHODS` (or ``--methods``), once per seed and new embedding width, and writes ``<out>/runs/<width>_seed<S>.json`` (every number of a run; runs
already there are reused, so an interrupted sweep resumes) and ``<out>/summary.json`` +
``summary.md``: per set, width and method, old/old, new/new and new/old top-1 and mAP (mean over
seeds), new/old minus old/old per seed, how many seeds meet the criterion, and the update gain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from bct_fast._core.io import atomic_write
from bct_fast.demo import ALL_METHODS, default_config, run_demo

METRICS = (("top1", "precision_at_1"), ("map", "mean_average_precision"))


def _pct(x: float) -> float:
    return round(100 * x, 2)


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per (width, set, method): means over seeds and per-seed gaps (percentage points)."""
    rows = []
    for width, width_runs in runs.items():
        for set_name in ("closed_set", "open_set"):
            methods = width_runs[0][set_name]["methods"]
            for method in methods:
                row: dict = {"new_embed_dim": width, "set": set_name, "method": method,
                             "seeds": [r["config"]["seed"] for r in width_runs]}
                for short, key in METRICS:
                    oo = [r[set_name]["old/old"][key] for r in width_runs]
                    nn_ = [r[set_name]["methods"][method]["new/new"][key] for r in width_runs]
                    no = [r[set_name]["methods"][method]["new/old"][key] for r in width_runs]
                    gaps = [_pct(b - a) for a, b in zip(oo, no)]
                    row[short] = {"old_old": _pct(statistics.mean(oo)), "new_new": _pct(statistics.mean(nn_)),
                                  "new_old": _pct(statistics.mean(no)), "gap_per_seed": gaps,
                                  "gap_mean": round(statistics.mean(gaps), 2),
                                  "seeds_compatible": sum(g > 0 for g in gaps)}
                gains = [r[set_name]["methods"][method]["update_gain"] for r in width_runs]
                row["update_gain_mean"] = round(statistics.mean(gains), 3)
                cost = methods[method].get("cost_per_item")
                if cost:
                    row["cost_per_item"] = cost
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| width | set | method | old/old top-1 (mAP) | new/new | new/old | new/old - old/old top-1: mean (seeds) "
           "| mAP gap mean | seeds passing (top-1) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t, m = r["top1"], r["map"]
        seeds = " / ".join(f"{g:+.1f}" for g in t["gap_per_seed"])
        out.append(f"| {r['new_embed_dim']} | {r['set'].replace('_set', '')} | {r['method']} | {t['old_old']:.1f} "
                   f"({m['old_old']:.1f}) | {t['new_new']:.1f} ({m['new_new']:.1f}) | {t['new_old']:.1f} "
                   f"({m['new_old']:.1f}) | **{t['gap_mean']:+.1f}** ({seeds}) | {m['gap_mean']:+.1f} | "
                   f"{t['seeds_compatible']}/{len(t['gap_per_seed'])} |")
    return "\n".join(out) + "\n"


def ood_config(dataset: str):
    """The demo's configuration for the out-of-domain sweep. CJK: a smaller run than the demo's
    realistic one (400 characters: the old model on 100, the new ones on 300, 100 held out; 32 px)
    so that three seeds fit in an hour on 2 cores."""
    if dataset == "cjk":
        return replace(default_config("cjk"), cjk_max_classes=400, old_classes=100, train_classes=300,
                       old_epochs=8, new_epochs=12, batch_size=128)
    return default_config(dataset)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", choices=["glyphs", "cjk"], default="glyphs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--new-embed-dim", type=int, nargs="+", default=None,
                   help="new-model widths (default: the old model's)")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    methods = tuple(m for m in args.methods.split(",") if m)
    runs: dict[str, list[dict]] = {}
    for width in args.new_embed_dim or [ood_config(args.dataset).embed_dim]:
        for seed in args.seeds:
            path = out / "runs" / f"{width}_seed{seed}.json"
            if path.exists():
                result = json.loads(path.read_text())
            else:
                cfg = replace(ood_config(args.dataset), protocol="families", seed=seed, methods=methods,
                              new_embed_dim=width)
                t0 = time.perf_counter()
                result = run_demo(cfg, progress=args.progress)
                result["seconds"] = round(time.perf_counter() - t0, 1)
                data = json.dumps(result, indent=1).encode()
                atomic_write(path, lambda f: f.write(data))
                print(f"width {width} seed {seed}: {result['seconds']} s", file=sys.stderr, flush=True)
            runs.setdefault(str(width), []).append(result)
    rows = summarize(runs)
    data = json.dumps({"protocol": "families", "dataset": args.dataset, "seeds": args.seeds, "rows": rows},
                      indent=1).encode()
    atomic_write(out / "summary.json", lambda f: f.write(data))
    table = markdown(rows)
    atomic_write(out / "summary.md", lambda f: f.write(table.encode()))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
