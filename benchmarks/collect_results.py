"""Merge one benchmark session into a single JSON: machine, build, test summary, every figure.

Used by benchmarks/gpu_session.sh; works on CPU machines too (device fields are then null).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import tempfile
import xml.etree.ElementTree as ET


def machine() -> dict:
    import torch

    try:  # a failed build leaves nothing to import: the JSON must still come back
        import bct_fast

        build = bct_fast.build_info()
    except Exception as e:  # noqa: BLE001 - whatever broke, say it and go on
        build = {"error": f"{type(e).__name__}: {e}"}
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "bct_fast": build, "gpu": None, "driver": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "sm_count": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _gpu_checks():
    """benchmarks/gpu_checks.py by path (this script runs with PYTHONSAFEPATH: its folder is not
    on sys.path)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_checks", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_checks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tests_summary(path: str) -> dict | None:
    """Totals of a junit XML, or of the .jsonl record tests/conftest.py writes as tests finish
    (collected vs finished shows a run its deadline stopped)."""
    if not path or not os.path.exists(path):
        return None
    if path.endswith(".jsonl"):
        rec = _gpu_checks().read_record(path)
        outcomes = list(rec["outcome"].values())
        return {"collected": rec["collected"], "collect_errors": rec["collect_errors"],
                "finished": len(outcomes),
                **{k: outcomes.count(k) for k in ("passed", "failed", "skipped")}}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped", "time")
    return {k: suite.get(k) for k in keys} if suite is not None else None


def bench_rows(path: str) -> list[dict]:
    """Rows of a pytest-benchmark JSON, or of the .jsonl record benchmarks/conftest.py appends
    as rows finish (BCT_FAST_BENCH_RECORD; a line cut short by a kill is ignored)."""
    if not path or not os.path.exists(path):
        return []
    if path.endswith(".jsonl"):
        return _gpu_checks().json_lines(path)
    raw = json.load(open(path))
    return [{"name": b["fullname"], "params": b.get("params"), "extra_info": b.get("extra_info"),
             "stats_s": {k: b["stats"][k] for k in ("min", "median", "mean", "stddev", "rounds")}}
            for b in raw.get("benchmarks", [])]


def merged_bench_rows(paths: list[str]) -> list[dict]:
    """Every row once: a pytest-benchmark JSON's row wins over the same row's record line."""
    rows: dict[str, dict] = {}
    for path in sorted(paths, key=lambda p: p.endswith(".jsonl")):  # the JSON files first
        for row in bench_rows(path):
            rows.setdefault(row["name"], row)
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bench", nargs="*", default=[], help="pytest-benchmark JSON files (missing ones skipped)")
    ap.add_argument("--tests", default="")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--rc", nargs="*", default=[], help="name=exit_code pairs")
    ap.add_argument("--steps", default="", help="file of step=verdict lines (gpu_session.sh)")
    ap.add_argument("--attach", nargs="*", default=[], help="JSON files to embed under their stem")
    a = ap.parse_args()
    steps = {}
    if a.steps and os.path.exists(a.steps):
        steps = dict(line.rstrip("\n").split("=", 1) for line in open(a.steps) if "=" in line)
    attached = {os.path.splitext(os.path.basename(p))[0]: json.load(open(p))
                for p in a.attach if os.path.exists(p) and os.path.getsize(p)}
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": a.commit, "exit_codes": dict(kv.split("=", 1) for kv in a.rc), "steps": steps,
           "machine": machine(), "tests": tests_summary(a.tests), **attached,
           "benchmarks": merged_bench_rows(a.bench)}
    # Atomic write: a partial JSON never lands under the final name.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(a.out)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, a.out)
    print(f"wrote {a.out} ({len(doc['benchmarks'])} benchmark rows)")


if __name__ == "__main__":
    main()
