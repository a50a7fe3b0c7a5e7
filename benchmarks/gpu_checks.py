"""The checks of benchmarks/gpu_session.sh, in Python so that CI can test them without a GPU.

    python benchmarks/gpu_checks.py cmake                  # local cmake >= pyproject's floor?
    python benchmarks/gpu_checks.py installed ROOT         # the installed build, not ROOT/bct_fast?
    python benchmarks/gpu_checks.py cuda-tests RESULTS     # every CUDA test ran and passed?
                                                           # (junit XML, or the .jsonl record)
    python benchmarks/gpu_checks.py sanitizer LOG RC [RECORD]  # clean | errors | refused | failed
                                                           # (+ per family, from the tests' record)
    python benchmarks/gpu_checks.py ncu CSV...             # Nsight Compute raw CSVs -> per kernel

Each prints one JSON object and exits 1 when the check fails. "GPU visible" is
``torch.cuda.is_available()``, or ``BCT_FAST_CHECK_FAKE_GPU=1`` (read only here: it lets the CI
test exercise the GPU branch of the CUDA-test check on a CPU machine).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_GPU_ENV = "BCT_FAST_CHECK_FAKE_GPU"


def gpu_visible() -> bool:
    if os.environ.get(FAKE_GPU_ENV) == "1":
        return True
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---- cmake ---------------------------------------------------------------------------------

def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(g or 0) for g in m.groups())


def cmake_floor(pyproject: Path = ROOT / "pyproject.toml") -> tuple[int, ...]:
    """The ``cmake.version = ">=X.Y.Z"`` floor of [tool.scikit-build]."""
    m = re.search(r'^cmake\.version\s*=\s*">=\s*([\d.]+)"', pyproject.read_text(), re.M)
    if not m:
        raise ValueError(f"{pyproject}: no cmake.version floor found")
    return _version_tuple(m.group(1))


def check_cmake(cmake: str = "cmake") -> dict:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60).stdout
        have = _version_tuple(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"ok": False, "cmake": None, "error": f"{cmake} --version failed: {e}"}
    floor = cmake_floor()
    return {"ok": have >= floor, "cmake": ".".join(map(str, have)), "floor": ".".join(map(str, floor))}


# ---- which bct_fast is imported ------------------------------------------------------------

def check_installed(root: Path, need_cuda: bool = True) -> dict:
    """Import bct_fast as the tests will (from ``root``, safe path: the current folder is not on
    sys.path) and report where it came from and what it was built with."""
    code = ("import json, bct_fast; i = bct_fast.build_info(); "
            "print(json.dumps({'file': bct_fast.__file__, 'extension_loaded': i['extension_loaded'], "
            "'cuda_compiled': i['cuda_compiled'], 'cuda_architectures': i['cuda_architectures'], "
            "'kernel_sources': i.get('kernel_sources'), 'extension_error': i.get('extension_error')}))")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                         timeout=300)
    if out.returncode != 0:
        return {"ok": False, "error": out.stderr.strip()[-2000:]}
    info = json.loads(out.stdout.strip().splitlines()[-1])
    problems = []
    if Path(info["file"]).resolve().is_relative_to((root / "bct_fast").resolve()):
        problems.append(f"bct_fast was imported from the source folder {root / 'bct_fast'}, not the build")
    if not info["extension_loaded"]:
        problems.append(f"bct_fast._C is not loaded: {info.get('extension_error')}")
    if need_cuda and not info["cuda_compiled"]:
        problems.append("bct_fast._C was built without its CUDA kernels")
    info.update(ok=not problems, problems=problems)
    return info


# ---- the CUDA tests of a junit XML ---------------------------------------------------------

def cuda_test_counts(junit: Path) -> dict[str, dict[str, int]]:
    """Per test file: passed / failed / skipped CUDA tests (the ``cuda`` property that
    tests/conftest.py records on every test carrying the ``cuda`` marker)."""
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props.get("cuda") != "1":
            continue
        file = case.get("file") or (case.get("classname") or "?").replace(".", "/") + ".py"
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        row = counts.setdefault(file, {"passed": 0, "failed": 0, "skipped": 0})
        row[outcome] += 1
    return counts


_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def json_lines(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file, skipping a line cut short by a kill."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_record(record: Path) -> dict:
    """The JSON-lines record tests/conftest.py writes (BCT_FAST_TEST_RECORD) as tests finish:
    ``outcome`` (nodeid -> passed / failed / skipped, the worst of its phases: a failing teardown
    fails a passed call), ``cuda`` (nodeids of finished CUDA tests), ``collected`` (count),
    ``collected_cuda`` (nodeid -> the kernel families it exercises) and ``collect_errors``. A line
    cut short by a kill is ignored."""
    out = {"outcome": {}, "cuda": set(), "collected": None, "collected_cuda": {}, "collect_errors": 0}
    for r in json_lines(record):
        if "collected_cuda" in r:
            out["collected"], out["collected_cuda"] = r["collected"], r["collected_cuda"]
        elif "collect_error" in r:
            out["collect_errors"] += 1
        else:
            if _RANK[r["outcome"]] > _RANK.get(out["outcome"].get(r["nodeid"], ""), -1):
                out["outcome"][r["nodeid"]] = r["outcome"]
            if r.get("cuda"):
                out["cuda"].add(r["nodeid"])
    return out


def record_counts(rec: dict) -> tuple[dict[str, dict[str, int]], list[str], int]:
    """Per test file passed / failed / skipped CUDA tests of a record (as read_record returns it),
    the collected CUDA tests that never finished (the deadline or a crash stopped the run), and
    the number of collection errors."""
    counts: dict[str, dict[str, int]] = {}
    for nodeid in rec["cuda"]:
        row = counts.setdefault(nodeid.split("::")[0], {"passed": 0, "failed": 0, "skipped": 0})
        row[rec["outcome"][nodeid]] += 1
    unfinished = [n for n in rec["collected_cuda"] if n not in rec["outcome"]]
    return counts, unfinished, rec["collect_errors"]


def family_counts(rec: dict) -> dict[str, dict[str, int]]:
    """Per kernel family (KERNEL_FAMILIES of the test files) of a record (as read_record returns
    it): its collected CUDA tests that passed / failed / skipped / never finished."""
    out: dict[str, dict[str, int]] = {}
    for nodeid, families in rec["collected_cuda"].items():
        outcome = rec["outcome"].get(nodeid, "unfinished")
        for family in families:
            row = out.setdefault(family, {"passed": 0, "failed": 0, "skipped": 0, "unfinished": 0})
            row[outcome] += 1
    return out


def check_cuda_tests(results: Path) -> dict:
    """On a machine with a GPU: at least one CUDA test ran, none failed, none was skipped
    (a skipped CUDA test on a GPU machine means the kernels were not what ran), and, from a
    .jsonl record, every collected CUDA test finished."""
    if not Path(results).exists():
        return {"ok": False, "gpu_visible": gpu_visible(), "problems": [f"{results} does not exist"]}
    unfinished: list[str] = []
    per_family = None
    if str(results).endswith(".jsonl"):
        rec = read_record(results)  # one read for both tallies
        counts, unfinished, suite_errors = record_counts(rec)
        per_family = family_counts(rec)
    else:
        counts = cuda_test_counts(results)
        suite_errors = sum(int(s.get("errors", 0)) for s in ET.parse(results).getroot().iter("testsuite"))
    total = {k: sum(r[k] for r in counts.values()) for k in ("passed", "failed", "skipped")}
    problems = []
    if total["failed"]:
        problems.append(f"{total['failed']} CUDA tests failed")
    if suite_errors:
        problems.append(f"{suite_errors} errors (collection or fixtures)")
    if unfinished:
        problems.append(f"{len(unfinished)} collected CUDA tests did not finish (deadline or crash), "
                        f"first: {unfinished[0]}")
    if gpu_visible():
        if total["skipped"]:
            problems.append(f"{total['skipped']} CUDA tests were skipped although a GPU is visible")
        if total["passed"] == 0:
            problems.append("no CUDA test ran although a GPU is visible")
    return {"ok": not problems, "gpu_visible": gpu_visible(), "total": total, "per_file": counts,
            "per_family": per_family, "unfinished": len(unfinished), "collect_errors": suite_errors,
            "problems": problems}


# ---- compute-sanitizer ---------------------------------------------------------------------

def sanitizer_verdict(log: str, rc: int) -> str:
    """``clean`` (0 errors), ``errors`` (it found some), ``refused`` (the machine does not
    support it: some GPU sandboxes) or ``failed`` (the run broke for another reason)."""
    # pytest ending before any CUDA call (a case id that no longer exists, a collection error)
    # also makes the sanitizer say the target "terminated before first instrumented API call":
    # that is a broken run, not a machine that refuses the tool.
    if re.search(r"ERROR: not found|no tests ran|errors? during collection|ERROR collecting", log):
        return "failed"
    if re.search(r"Device not supported|not supported on this|Unable to find injection library|"
                 r"CUDA_ERROR_NOT_SUPPORTED|error 999|Target application terminated before first "
                 r"instrumented API call", log):
        return "refused"
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK SUMMARY: N hazards
    # displayed (E errors, W warnings)" (a warning is a possible hazard: counted as one).
    # Every summary line counts (a target that starts several processes prints several).
    counts = [int(n) for n in re.findall(r"(?:ERROR|RACECHECK) SUMMARY:\s*(\d+)\s+(?:errors?|hazards?)\b", log)]
    if any(counts):
        return "errors"
    if counts and rc == 0:
        return "clean"
    return "failed"


def pytest_exit_code(log: str) -> int | None:
    """The exit code a sanitizer log implies: 1 when pytest's closing line names a failure or
    error, or compute-sanitizer says the target returned an error (a crash after that line, at
    teardown); 0 when the line shows passed tests and nothing else went wrong; None without such
    a line (cut off, crashed) or with nothing passed. For runs recorded before the sanitizer
    step kept its exit code: under ``--error-exitcode 1`` compute-sanitizer exits with the
    application's code when it reports no error, and with 1 when it does."""
    if "Target application returned an error" in log:
        return 1
    last = pytest_summary_line(log)
    if last is None:
        return None
    return 1 if re.search(r"\d+ (failed|errors?)\b", last) else (0 if " passed" in last else None)


def pytest_summary_line(log: str) -> str | None:
    """pytest's closing line ("18 passed in 66.17s", "1 failed, 17 passed, 2 deselected in
    4.00s", with or without its ``=`` frame), the last one in the log; None without one."""
    lines = [ln.strip() for ln in log.splitlines()
             if re.fullmatch(r"=*\s*\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|"
                             r"warnings?)\b.* in [\d.]+s.*", ln.strip())]
    return lines[-1] if lines else None


# ---- Nsight Compute --------------------------------------------------------------------------

_NCU_ID_COLUMNS = {"ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context",
                   "Stream", "Block Size", "Grid Size", "Device", "CC"}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def ncu_summary(paths: list[Path]) -> dict:
    """Per CSV (its file stem: one workload) and kernel name: launches profiled and the mean of
    every numeric metric, from the CSVs of ``ncu --csv --page raw`` (a header row, a units row,
    one row per launch; any text before the header, such as ncu's ==PROF== lines, is skipped)."""
    import csv

    out: dict[str, dict] = {}
    problems = []
    for path in paths:
        kernels: dict[str, dict] = {}
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
        if start is None:
            problems.append(f"{path.name}: no ncu CSV table")
            continue
        rows = list(csv.reader(lines[start:]))
        header, units = rows[0], rows[1] if len(rows) > 1 else []
        for row in rows[2:]:
            if len(row) != len(header):
                continue
            rec = dict(zip(header, row))
            k = kernels.setdefault(rec.get("Kernel Name", "?"), {"launches": 0, "sums": {}, "units": {}})
            k["launches"] += 1
            for col, unit, val in zip(header, units or [""] * len(header), row):
                v = _number(val)
                if col in _NCU_ID_COLUMNS or v is None:
                    continue
                k["sums"][col] = k["sums"].get(col, 0.0) + v
                k["units"][col] = unit
        out[path.stem] = {name: {"launches": k["launches"],
                                 "mean": {c: round(v / k["launches"], 6) for c, v in k["sums"].items()},
                                 "units": k["units"]}
                          for name, k in kernels.items()}
    return {"ok": any(out.values()) and not problems, "workloads": out, "problems": problems}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "cmake":
        res = check_cmake(*args[:1])
    elif cmd == "installed":
        res = check_installed(Path(args[0]), need_cuda=os.environ.get("BCT_FAST_CUDA", "ON") != "OFF")
    elif cmd == "cuda-tests":
        res = check_cuda_tests(Path(args[0]))
    elif cmd == "sanitizer":
        log = Path(args[0]).read_text(errors="replace") if Path(args[0]).exists() else ""
        verdict = sanitizer_verdict(log, int(args[1]))
        res = {"ok": verdict in ("clean", "refused"), "verdict": verdict, "rc": int(args[1])}
        if len(args) > 2 and Path(args[2]).exists():  # the record of the tests it ran
            res["per_family"] = family_counts(read_record(Path(args[2])))
    elif cmd == "ncu":
        res = ncu_summary([Path(a) for a in args])
    else:
        print(f"unknown check {cmd!r}\n{__doc__}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
