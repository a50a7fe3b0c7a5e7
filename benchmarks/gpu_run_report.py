"""The first read of a GPU run's JSON (gpu_session.sh): everything a session needs to decide its
next step, on one page, in the order of issue 15's "done when".

    python benchmarks/gpu_run_report.py benchmarks/results/gpu_<stamp>.json [--out REPORT.md]

Prints (and with ``--out`` writes atomically) the machine and commit, the steps, the CUDA tests
per kernel family, each sanitizer process's verdict, what verify_gpu_run.py would verify, the
trace (GPU busy fraction per provider, the host's cost per op) and the benchmark tables
(benchmarks/summary.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _row(counts: dict) -> str:
    return " / ".join(f"{k} {counts.get(k, 0)}" for k in ("passed", "failed", "skipped", "unfinished"))


def report(run: dict, root: Path = HERE.parent) -> str:
    out = io.StringIO()
    p = lambda *a: print(*a, file=out)  # noqa: E731
    m = run.get("machine") or {}
    gpu = (m.get("gpu") or {}).get("name", "no GPU")
    p(f"# GPU run {run.get('date', '?')}: {gpu}, driver {m.get('driver', '?')}, torch {m.get('torch', '?')}, "
      f"commit {str(run.get('commit', '?'))[:12]}")
    p("\n## Steps\n")
    for step, status in (run.get("steps") or {}).items():
        p(f"- {step}: {status}")
    p("\n## CUDA tests per kernel family\n")
    tests = run.get("cuda_tests") or {}
    for family, counts in sorted((tests.get("per_family") or {}).items()):
        p(f"- {family}: {_row(counts)}")
    if tests.get("problems"):
        p(f"- problems: {tests['problems']}")
    p("\n## Sanitizer processes\n")
    for name in sorted(k for k in run if k.startswith("sanitizer_")):
        san = run[name] or {}
        p(f"- {name}: **{san.get('verdict', 'no verdict')}**")
        for family, counts in sorted((san.get("per_family") or {}).items()):
            p(f"  - {family}: {_row(counts)}")
    p("\n## What verify_gpu_run.py would verify (this checkout's sources)\n")
    verify = _module("verify_gpu_run")
    verdicts = verify.family_verdicts(run, verify._source_hashes(root))
    for family, v in verdicts.items():
        p(f"- {family}: " + ("**verified**" if v["verified"] else "not verified: " + "; ".join(v["reasons"])))
    trace = run.get("trace_providers") or {}
    if trace:
        p("\n## Trace (benchmarks/trace_providers.py)\n")
        p(f"host cost per op (us): {trace.get('host_us_per_op')}\n")
        p("| workload | wall ms | GPU kernel ms | GPU busy | launches | top GPU op |")
        p("| --- | --- | --- | --- | --- | --- |")
        for w, r in (trace.get("workloads") or {}).items():
            if "error" in r:
                p(f"| {w} | error: {r['error'][:80]} | | | | |")
                continue
            top = (r.get("top_gpu") or [{}])[0]
            p(f"| {w} | {r.get('wall_ms')} | {r.get('gpu_kernel_ms', '-')} | {r.get('gpu_busy', '-')} | "
              f"{r.get('kernel_launches', '-')} | {top.get('op', '-')[:60]} |")
    if run.get("benchmarks"):
        p("\n## Benchmarks\n")
        summary = _module("summary")
        p(summary.render_markdown(summary.build_tables(summary.cases_from_doc(run)), title="Tables"))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    run = _module("verify_gpu_run").read_run(a.run)
    if run is None:
        return 2
    text = report(run)
    print(text)
    if a.out:
        fd, tmp = tempfile.mkstemp(dir=a.out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
