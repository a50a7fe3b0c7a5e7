"""Which kernel families a recorded GPU run verifies, and (with --write) the entries it adds to
bct_fast/_core/gpu_verified.json: the record that makes a family's kernels the default (issue 15,
part 3). Run it here on the JSON a lease brought back, commit both files in one change.

    python benchmarks/verify_gpu_run.py benchmarks/results/gpu_<stamp>.json [--write]

A run verifies a family when all of these hold:
  - a GPU ran it (``machine.gpu``) and the tests imported the installed build (``installed.ok``);
  - the run's build of the family was compiled from this checkout's sources
    (``installed.kernel_sources`` equals ``source_hashes``): an entry names exact sources;
  - no collection error, no CUDA test from a file without ``KERNEL_FAMILIES``, and every
    collected CUDA test that names the family (its file's ``KERNEL_FAMILIES``) finished and
    passed: none failed, skipped or unfinished;
  - compute-sanitizer memcheck and racecheck: for each tool, the machine ``refused`` it (every
    process of the tool said so and no test ran under any), or the family's cases ran under it,
    at least one passed in the process of the family's own group (``sanitizer_<tool>_margin`` /
    ``_topk``, or the single ``sanitizer_<tool>`` of the earlier layout), and every process of
    that tool in which the family's cases ran said ``clean`` with none of them failing or
    unfinished. A group with no case of the family (whatever its verdict) does not count for
    it: the groups are separate processes. Passes in another group do not count either: test
    files declare families per file, so a margin case of a file naming both kinds of family is
    counted for the top-k ones too, although no top-k kernel ran in it.
Anything missing (a step skipped for time, say) verifies nothing. Prints one JSON object.

``--sanitizer-logs DIR`` grades each sanitizer process again from its log (``DIR/<name>.log``,
as the lease brought it back) with this checkout's ``gpu_checks.sanitizer_verdict``: for a run
graded by an older parser (the lease of 2026-11-26 10:08 UTC read racecheck's "RACECHECK
SUMMARY: 0 hazards" as no summary at all). Each log needs its test record beside it
(``<name>.jsonl``) with the run's per-family counts, and pytest's closing line the record's
passed count (so a folder from another run is refused). The exit code is the run's own where it
kept one, else the one the log implies; without either the process is ``failed``. The regrades
are printed and named in the entries written.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "bct_fast" / "_core" / "gpu_verified.json"
SANITIZERS = ("memcheck", "racecheck")
# The sanitizer group (gpu_session.sh: SAN_MARGIN / SAN_TOPK) whose cases run each family's kernels.
SANITIZER_GROUP = {"margin_softmax": "margin", "margin_epilogue": "margin", "margin_fused": "margin",
                   "cosine_topk": "topk", "topk_epilogue": "topk", "topk_fused": "topk"}
_COUNTS = ("passed", "failed", "skipped", "unfinished")


def sanitizer_runs(run: dict, tool: str) -> dict[str, dict]:
    """The run's sanitizer processes of one tool: ``sanitizer_<tool>`` (one process for all
    cases, the earlier layout) and ``sanitizer_<tool>_<group>`` (one per group)."""
    name = f"sanitizer_{tool}"
    return {k: v for k, v in run.items()
            if (k == name or k.startswith(name + "_")) and isinstance(v, dict)}


def _ran(proc: dict) -> bool:
    """Whether any test finished (or was started) under this sanitizer process."""
    return any(row.get(key) for row in (proc.get("per_family") or {}).values() for key in _COUNTS)


def _sanitizer_reasons(run: dict, tool: str, family: str) -> list[str]:
    procs = sanitizer_runs(run, tool)
    if not procs:
        return [f"sanitizer {tool}: not run"]
    if all(p.get("verdict") == "refused" for p in procs.values()):
        if any(_ran(p) for p in procs.values()):
            return [f"sanitizer {tool}: said 'refused' although tests ran under it"]
        return []
    reasons, passed = [], 0
    grouped = any(name != f"sanitizer_{tool}" for name in procs)
    own = f"sanitizer_{tool}_{SANITIZER_GROUP.get(family, '?')}"
    if grouped and own not in procs:
        reasons.append(f"{own}: not run (the process with this family's own cases)")
    for name, p in sorted(procs.items()):
        row = (p.get("per_family") or {}).get(family) or {}
        if not any(row.get(key) for key in _COUNTS):
            continue  # none of the family's cases in this process
        if p.get("verdict") != "clean":
            reasons.append(f"{name}: {p.get('verdict') or 'no verdict'}")
        elif row.get("failed") or row.get("unfinished"):
            reasons.append(f"{name}: this family's cases did not all pass under it ({row})")
        if not grouped or name == own:
            passed += row.get("passed", 0)
    if not reasons and not passed:
        reasons.append(f"sanitizer {tool}: none of this family's cases passed under it")
    return reasons


def _gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", Path(__file__).with_name("gpu_checks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log_matches_run(checks, log: str, record_path: Path, proc: dict) -> str | None:
    """Why the log and its test record cannot be this process's, or None. The record (the
    tests' JSON lines, beside the log) must give the run's own per-family counts, and pytest's
    closing line the record's number of passed tests: a folder from another run or commit fails."""
    if not record_path.is_file():
        return f"no test record {record_path.name} beside the log"
    rec = checks.read_record(record_path)
    if checks.family_counts(rec) != (proc.get("per_family") or {}):
        return "its test record's per-family counts differ from the run's"
    passed = sum(1 for outcome in rec["outcome"].values() if outcome == "passed")
    m = re.search(r"(\d+) passed", checks.pytest_summary_line(log) or "")
    if m is None or int(m.group(1)) != passed:
        return f"pytest's closing line does not show the record's {passed} passed tests"
    return None


def regrade_sanitizers(run: dict, log_dir: Path) -> tuple[dict, list[dict]]:
    """A copy of the run whose sanitizer verdicts come from their logs in ``log_dir`` (each with
    its test record, ``<name>.jsonl``, that must match the run), and one row per process whose
    log was there (name, old and new verdict, the exit code used, or why it was not regraded)."""
    checks = _gpu_checks()
    run = copy.deepcopy(run)
    rows = []
    for tool in SANITIZERS:
        for name, proc in sorted(sanitizer_runs(run, tool).items()):
            log_path = log_dir / f"{name}.log"
            if not log_path.is_file():
                continue
            log = log_path.read_text(errors="replace")
            mismatch = _log_matches_run(checks, log, log_dir / f"{name}.jsonl", proc)
            if mismatch is not None:
                rows.append({"process": name, "recorded": proc.get("verdict"), "regraded": None,
                             "why_not": mismatch})
                continue
            rc = proc.get("rc")
            source = "run"
            if rc is None:
                rc, source = checks.pytest_exit_code(log), "the log (pytest's closing line)"
            verdict = checks.sanitizer_verdict(log, 1 if rc is None else rc)
            rows.append({"process": name, "recorded": proc.get("verdict"), "regraded": verdict,
                         "rc": rc, "rc_from": source if rc is not None else "none (counted as 1)"})
            proc["verdict"] = verdict
    return run, rows


def _source_hashes(root: Path) -> dict[str, str]:
    sys.path.insert(0, str(root))  # the checkout's own hashing (no torch, no extension needed)
    try:
        from bct_fast._core.extension import source_hashes
    finally:
        sys.path.pop(0)
    return source_hashes(root)


def family_verdicts(run: dict, hashes: dict[str, str]) -> dict[str, dict]:
    """Per family: ``verified`` and, when not, ``reasons``."""
    gpu = (run.get("machine") or {}).get("gpu")
    installed = run.get("installed") or {}
    built = installed.get("kernel_sources") or {}
    tests = run.get("cuda_tests") or {}
    per_family = tests.get("per_family") or {}
    undeclared = per_family.get("undeclared") or {}
    out = {}
    for family, sha in hashes.items():
        reasons = []
        if any(undeclared.values()):
            reasons.append("CUDA tests of a file without KERNEL_FAMILIES ran: no result can be attributed")
        if not gpu:
            reasons.append("no GPU in the run")
        if not installed.get("ok"):
            reasons.append("the installed-build check did not pass")
        if built.get(family) != sha:
            reasons.append("the run's build has other sources than this checkout")
        if tests.get("collect_errors"):
            reasons.append("collection errors")
        row = per_family.get(family)
        if not row or not row.get("passed"):
            reasons.append("no CUDA test of this family passed in the run")
        elif row.get("failed") or row.get("skipped") or row.get("unfinished"):
            reasons.append(f"CUDA tests: {row}")
        for tool in SANITIZERS:
            reasons.extend(_sanitizer_reasons(run, tool, family))
        out[family] = {"verified": not reasons, "reasons": reasons}
    return out


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def entry(run: dict, run_path: Path, sha: str, log_dir: Path | None = None) -> dict:
    """The record entry of one verified family; ``log_dir`` only where a regrade took place."""
    verdicts = {p.get("verdict") for t in SANITIZERS for p in sanitizer_runs(run, t).values()}
    out = {"sha256": sha, "result": _relative(run_path), "device": run["machine"]["gpu"]["name"],
           "date": run.get("date"), "commit": run.get("commit"),
           "sanitizer": "refused" if "refused" in verdicts else "clean"}
    if log_dir is not None:
        out["sanitizer_graded_from_logs"] = _relative(log_dir)
    return out


def write_record(record_path: Path, additions: dict[str, dict]) -> dict:
    """Adds the entries (one per family, skipping a sha256 already listed), atomically."""
    record = json.loads(record_path.read_text())
    for family, e in additions.items():
        runs = record.setdefault(family, [])
        if not any(r.get("sha256") == e["sha256"] for r in runs):
            runs.append(e)
    fd, tmp = tempfile.mkstemp(dir=record_path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, record_path)
    return record


def read_run(path: Path) -> dict | None:
    """A run's JSON, or None after saying on stderr why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{path}: cannot read the run's JSON ({e})", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="gpu_<stamp>.json from benchmarks/gpu_session.sh")
    ap.add_argument("--write", action="store_true", help="add the verified families to the record")
    ap.add_argument("--sanitizer-logs", type=Path, metavar="DIR",
                    help="grade the sanitizer processes again from DIR/<name>.log")
    ap.add_argument("--record", type=Path, default=RECORD, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    run = read_run(a.run)
    if run is None:
        return 2
    regrades = None
    if a.sanitizer_logs is not None:
        if not a.sanitizer_logs.is_dir():
            print(f"--sanitizer-logs: {a.sanitizer_logs} is not a folder", file=sys.stderr)
            return 2
        run, regrades = regrade_sanitizers(run, a.sanitizer_logs)
    hashes = _source_hashes(a.root)
    verdicts = family_verdicts(run, hashes)
    regraded_dir = a.sanitizer_logs if regrades and any(r["regraded"] for r in regrades) else None
    verified = {f: entry(run, a.run, hashes[f], regraded_dir) for f, v in verdicts.items()
                if v["verified"]}
    if a.write and verified:
        write_record(a.record, verified)
    out = {"run": str(a.run), "verified": sorted(verified), "families": verdicts,
           "written": bool(a.write and verified)}
    if regrades is not None:
        out["sanitizer_regraded"] = regrades
    print(json.dumps(out, indent=1))
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
