"""benchmarks/verify_gpu_run.py: what a recorded GPU run may add to gpu_verified.json (the record
that makes a kernel family the default). Tested without a GPU on synthetic runs: every missing
or failing piece of evidence must keep the family out, and only that family."""
import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bct_fast._core import extension

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("verify_gpu_run", ROOT / "benchmarks" / "verify_gpu_run.py")
verify = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify)
_spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
verify_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify_checks)

HASHES = extension.source_hashes(ROOT)


def empty_record() -> str:
    """A record with no family verified: the tests must not depend on what the repository's
    record holds (after a lease it lists families, and these tests must still pass)."""
    about = json.loads(extension._VERIFIED_RECORD.read_text())["_about"]
    return json.dumps({"_about": about, **{family: [] for family in HASHES}}, indent=2)
FAMILIES = sorted(HASHES)


def good_run() -> dict:
    passed = {"passed": 2, "failed": 0, "skipped": 0, "unfinished": 0}
    sanitizer = {"verdict": "clean", "per_family": {f: dict(passed) for f in FAMILIES}}
    return {"date": "2026-11-25T00:00:00+00:00", "commit": "abc123",
            "machine": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}},
            "installed": {"ok": True, "kernel_sources": dict(HASHES)},
            "cuda_tests": {"collect_errors": 0, "per_family": {f: dict(passed) for f in FAMILIES}},
            "sanitizer_memcheck": copy.deepcopy(sanitizer), "sanitizer_racecheck": copy.deepcopy(sanitizer)}


def verified(run: dict) -> set[str]:
    return {f for f, v in verify.family_verdicts(run, HASHES).items() if v["verified"]}


def test_a_complete_run_verifies_every_family():
    assert verified(good_run()) == set(FAMILIES)


def _fail_test(run, family, key):
    run["cuda_tests"]["per_family"][family][key] = 1


ONE_FAMILY = {
    "a failed test": lambda r, f: _fail_test(r, f, "failed"),
    "a skipped test": lambda r, f: _fail_test(r, f, "skipped"),
    "an unfinished test": lambda r, f: _fail_test(r, f, "unfinished"),
    "no test": lambda r, f: r["cuda_tests"]["per_family"].pop(f),
    "other sources": lambda r, f: r["installed"]["kernel_sources"].__setitem__(f, "0" * 64),
    "no sanitizer case": lambda r, f: r["sanitizer_racecheck"]["per_family"].pop(f),
    "a failing sanitizer case": lambda r, f: r["sanitizer_memcheck"]["per_family"][f].__setitem__("failed", 1),
}


@pytest.mark.parametrize("family", ["topk_fused", "margin_epilogue"])
@pytest.mark.parametrize("breakage", sorted(ONE_FAMILY))
def test_missing_evidence_keeps_only_that_family_out(breakage, family):
    run = good_run()
    ONE_FAMILY[breakage](run, family)
    assert verified(run) == set(FAMILIES) - {family}
    assert verify.family_verdicts(run, HASHES)[family]["reasons"]


EVERY_FAMILY = {
    "no GPU": lambda r: r["machine"].__setitem__("gpu", None),
    "installed check failed": lambda r: r["installed"].__setitem__("ok", False),
    "collection errors": lambda r: r["cuda_tests"].__setitem__("collect_errors", 1),
    "no CUDA tests step": lambda r: r.pop("cuda_tests"),
    "sanitizer errors": lambda r: r["sanitizer_memcheck"].__setitem__("verdict", "errors"),
    "sanitizer failed to run": lambda r: r["sanitizer_racecheck"].__setitem__("verdict", "failed"),
    "sanitizer skipped for time": lambda r: r.pop("sanitizer_racecheck"),
    "a CUDA test without KERNEL_FAMILIES": lambda r: r["cuda_tests"]["per_family"].__setitem__(
        "undeclared", {"passed": 1, "failed": 0, "skipped": 0, "unfinished": 0}),
}


@pytest.mark.parametrize("breakage", sorted(EVERY_FAMILY))
def test_run_wide_failures_verify_nothing(breakage):
    run = good_run()
    EVERY_FAMILY[breakage](run)
    assert verified(run) == set()


def test_a_machine_that_refuses_the_sanitizer_still_verifies():
    run = good_run()
    for tool in verify.SANITIZERS:
        run[f"sanitizer_{tool}"] = {"verdict": "refused"}
    assert verified(run) == set(FAMILIES)


MARGIN_GROUP = ("margin_softmax", "cosine_topk", "margin_epilogue", "margin_fused")
TOPK_GROUP = ("margin_softmax", "cosine_topk", "topk_fused", "topk_epilogue")  # test_kernels_small_cuda: both


def grouped_run() -> dict:
    """The sanitizer as gpu_session.sh runs it now: one process per tool and group."""
    run = good_run()
    passed = {"passed": 2, "failed": 0, "skipped": 0, "unfinished": 0}
    for tool in verify.SANITIZERS:
        del run[f"sanitizer_{tool}"]
        for group, families in (("margin", MARGIN_GROUP), ("topk", TOPK_GROUP)):
            run[f"sanitizer_{tool}_{group}"] = {"verdict": "clean",
                                                "per_family": {f: dict(passed) for f in families}}
    return run


def test_grouped_sanitizer_processes_verify_every_family():
    assert verified(grouped_run()) == set(FAMILIES)


@pytest.mark.parametrize("verdict", ["failed", "errors"])
@pytest.mark.parametrize("group,families", [("margin", MARGIN_GROUP), ("topk", TOPK_GROUP)])
def test_a_broken_group_keeps_out_only_the_families_with_cases_in_it(verdict, group, families):
    """A racecheck group cut off by its timeout (the first GPU run's fate) or finding hazards:
    every family with a case in that process stays out, whatever its row says; the others not."""
    run = grouped_run()
    run[f"sanitizer_racecheck_{group}"]["verdict"] = verdict
    assert verified(run) == set(FAMILIES) - set(families)


def test_an_unfinished_case_in_a_clean_looking_group_keeps_its_family_out():
    run = grouped_run()
    run["sanitizer_memcheck_topk"]["per_family"]["topk_epilogue"]["unfinished"] = 1
    assert verified(run) == set(FAMILIES) - {"topk_epilogue"}


def test_grouped_sanitizer_missing_a_tool_verifies_nothing():
    run = grouped_run()
    for key in [k for k in run if k.startswith("sanitizer_racecheck")]:
        del run[key]
    assert verified(run) == set()


MARGIN_FAMILIES = {"margin_softmax", "margin_epilogue", "margin_fused"}


def test_a_group_skipped_for_time_keeps_its_families_out():
    """Racecheck's top-k group never ran (the deadline): no top-k family verifies, though the
    margin group counted passes for cosine_topk (its file names both kinds of family) where no
    top-k kernel ran. The margin families still verify."""
    run = grouped_run()
    del run["sanitizer_racecheck_topk"]
    assert verified(run) == MARGIN_FAMILIES


def test_a_refused_group_beside_a_clean_one_is_not_a_refusal():
    """One group 'refused' (pytest ended before any CUDA call), the other clean: the machine runs
    the tool, so the refused group's families have no sanitizer result and stay out."""
    run = grouped_run()
    run["sanitizer_memcheck_topk"] = {"verdict": "refused", "per_family": {}}
    assert verified(run) == MARGIN_FAMILIES


def test_refused_with_tests_run_under_it_verifies_nothing():
    run = good_run()
    for tool in verify.SANITIZERS:
        run[f"sanitizer_{tool}"]["verdict"] = "refused"  # per_family still shows passed tests
    assert verified(run) == set()


def test_a_vanished_case_id_is_a_failed_sanitizer_run_not_a_refusal():
    log = ("ERROR: not found: /repo/tests/ops/test_x.py::test_renamed\n"
           "========= Target application terminated before first instrumented API call\n")
    assert verify_checks.sanitizer_verdict(log, 4) == "failed"
    refusal = "========= Target application terminated before first instrumented API call\n"
    assert verify_checks.sanitizer_verdict(refusal, 1) == "refused"


def test_every_case_id_the_session_names_is_collected():
    """FIRST, SAN_MARGIN and SAN_TOPK of gpu_session.sh name single tests: one that was renamed
    would make its sanitizer process end before any CUDA call. Collected as on a GPU machine."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    ids = set()
    for name in ("FIRST", "SAN_MARGIN", "SAN_TOPK"):
        block = script[script.index(f"{name}=("):]
        block = block[:block.index(")\n")]
        ids.update(re.findall(r'"(tests/[^"]+)"', block))
    assert len(ids) > 10
    env = dict(os.environ, BCT_FAST_TEST_DEVICE="all")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *sorted(ids)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = set(r.stdout.split())
    for i in ids:
        assert i in collected or any(c.startswith(i + "::") or c.startswith(i + "[") for c in collected), i


def test_write_adds_entries_once_and_the_provider_logic_reads_them(tmp_path, monkeypatch):
    record = tmp_path / "gpu_verified.json"
    record.write_text(empty_record())
    run = good_run()
    run["cuda_tests"]["per_family"]["topk_fused"]["failed"] = 1
    run_path = tmp_path / "gpu_x.json"
    run_path.write_text(json.dumps(run))
    args = [str(run_path), "--write", "--record", str(record)]
    assert verify.main(args) == 0
    assert verify.main(args) == 0  # a second write adds nothing
    rec = json.loads(record.read_text())
    assert rec["topk_fused"] == []
    assert [e["sha256"] for e in rec["margin_fused"]] == [HASHES["margin_fused"]]
    assert rec["margin_fused"][0]["device"] == "NVIDIA H100 80GB HBM3"
    # The provider layer's own check now calls these sources verified (built = this checkout).
    monkeypatch.setattr(extension, "_VERIFIED_RECORD", record)
    monkeypatch.setattr(extension, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setattr(extension, "built_source_hashes", lambda: dict(HASHES))
    v = extension.kernel_verification()
    assert v["margin_fused"]["verified_on_gpu"] and not v["topk_fused"]["verified_on_gpu"]


def test_a_run_without_evidence_writes_nothing(tmp_path):
    record = tmp_path / "gpu_verified.json"
    before = empty_record()
    record.write_text(before)
    run_path = tmp_path / "gpu_x.json"
    run_path.write_text(json.dumps({"machine": {"gpu": None}}))
    assert verify.main([str(run_path), "--write", "--record", str(record)]) == 1
    assert record.read_text() == before


def _declared_families(test_file: Path) -> tuple[str, ...]:
    m = re.search(r"^KERNEL_FAMILIES = (\(.*\))$", test_file.read_text(), re.M)
    assert m, f"{test_file} declares no KERNEL_FAMILIES"
    return ast.literal_eval(m.group(1))


def test_every_family_has_cuda_tests_and_sanitizer_cases():
    """A family no CUDA test names, or none of the sanitizer step's cases covers, could never be
    verified: the GPU session would spend its lease and flip nothing."""
    named = set()
    for f in (ROOT / "tests").rglob("test_*.py"):
        if re.search(r"^KERNEL_FAMILIES = ", f.read_text(), re.M):
            named.update(_declared_families(f))
    assert named == set(FAMILIES)
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    sanitizer_block = script[script.index("FIRST=("):script.index("# ---- 6.")]
    files = set(re.findall(r"(tests/ops/test_\w+\.py)", sanitizer_block))
    covered = set()
    for f in files:
        covered.update(_declared_families(ROOT / f))
    assert covered == set(FAMILIES), set(FAMILIES) - covered


def test_a_gpu_machine_collects_every_cuda_test_with_its_families(tmp_path):
    """Collection as on a GPU machine (BCT_FAST_TEST_DEVICE=all adds the device=cuda cases): it
    succeeds, and every CUDA test's file declares KERNEL_FAMILIES with known family names."""
    record = tmp_path / "collect.jsonl"
    env = dict(os.environ, BCT_FAST_TEST_DEVICE="all", BCT_FAST_TEST_RECORD=str(record))
    r = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = verify_checks.read_record(record)
    assert rec["collect_errors"] == 0
    cuda = rec["collected_cuda"]
    device_cases = [n for n in cuda if "cuda" in n.split("[")[-1]]
    assert len(cuda) > 173 and device_cases, "the device=cuda cases were not collected"
    unknown = {n: f for n, f in cuda.items() if not f or not set(f) <= set(FAMILIES)}
    assert not unknown, list(unknown.items())[:5]


CLEAN_RACECHECK_LOG = ("========= COMPUTE-SANITIZER\n..  [100%]\n2 passed in 66.17s (0:01:06)\n"
                       "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")


def _test_record(families) -> str:
    """The tests' JSON-lines record of a grouped_run() process: two CUDA tests naming every
    family of the group, both passed (per family: 2 passed)."""
    rows = [{"collected": 2, "collected_cuda": {"t.py::a": list(families), "t.py::b": list(families)}}]
    rows += [{"nodeid": n, "when": "call", "outcome": "passed", "cuda": True} for n in ("t.py::a", "t.py::b")]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _misgraded_run(tmp_path, logs: dict[str, str], records: bool = True):
    """A grouped run whose racecheck processes an older parser called 'failed', with the logs
    (and, unless ``records`` is False, each process's test record beside its log)."""
    run = grouped_run()
    for group in ("margin", "topk"):
        run[f"sanitizer_racecheck_{group}"]["verdict"] = "failed"
    run_path = tmp_path / "gpu_x.json"
    run_path.write_text(json.dumps(run))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    for name, text in logs.items():
        (log_dir / f"{name}.log").write_text(text)
        if records:
            group = MARGIN_GROUP if name.endswith("_margin") else TOPK_GROUP
            (log_dir / f"{name}.jsonl").write_text(_test_record(group))
    return run_path, log_dir


def _main_json(args, capsys):
    rc = verify.main(args)
    return rc, json.loads(capsys.readouterr().out)


def test_sanitizer_logs_regrade_a_misread_racecheck(tmp_path, capsys):
    run_path, log_dir = _misgraded_run(tmp_path, {"sanitizer_racecheck_margin": CLEAN_RACECHECK_LOG,
                                                  "sanitizer_racecheck_topk": CLEAN_RACECHECK_LOG})
    rc, out = _main_json([str(run_path)], capsys)
    assert rc == 1 and out["verified"] == []  # as recorded
    record = tmp_path / "gpu_verified.json"
    record.write_text(empty_record())
    rc, out = _main_json([str(run_path), "--sanitizer-logs", str(log_dir), "--write",
                          "--record", str(record)], capsys)
    assert rc == 0 and out["verified"] == FAMILIES
    assert {r["process"]: (r["recorded"], r["regraded"], r["rc"]) for r in out["sanitizer_regraded"]} == {
        "sanitizer_racecheck_margin": ("failed", "clean", 0),
        "sanitizer_racecheck_topk": ("failed", "clean", 0)}
    entries = json.loads(record.read_text())
    assert all(e[0]["sanitizer_graded_from_logs"] == str(log_dir) for f, e in entries.items() if f != "_about")


HAZARDS = CLEAN_RACECHECK_LOG.replace("0 hazards displayed (0 errors", "3 hazards displayed (3 errors")


@pytest.mark.parametrize("margin_log,rc_kept", [
    (HAZARDS, None),                                             # hazards found
    ("========= COMPUTE-SANITIZER\n..\n", None),                 # cut off before pytest's summary
    (CLEAN_RACECHECK_LOG, 1),                                    # the run's own exit code wins
    (CLEAN_RACECHECK_LOG + "========= Target application returned an error\n", None),  # crash after
    (CLEAN_RACECHECK_LOG + "========= ERROR SUMMARY: 1 error\n", None),   # a second summary line
    (CLEAN_RACECHECK_LOG.replace("2 passed", "18 passed"), None),  # another run's log
])
def test_sanitizer_logs_regrade_keeps_out_what_the_log_does_not_show_clean(
        tmp_path, capsys, margin_log, rc_kept):
    run_path, log_dir = _misgraded_run(tmp_path, {"sanitizer_racecheck_margin": margin_log,
                                                  "sanitizer_racecheck_topk": CLEAN_RACECHECK_LOG})
    if rc_kept is not None:
        run = json.loads(run_path.read_text())
        run["sanitizer_racecheck_margin"]["rc"] = rc_kept
        run_path.write_text(json.dumps(run))
    _, out = _main_json([str(run_path), "--sanitizer-logs", str(log_dir)], capsys)
    # margin_softmax / cosine_topk cases also ran in the margin group: they need both clean
    assert set(out["verified"]) == set(TOPK_GROUP) - set(MARGIN_GROUP)


def test_sanitizer_logs_need_the_runs_own_test_records(tmp_path, capsys):
    run_path, log_dir = _misgraded_run(tmp_path, {"sanitizer_racecheck_margin": CLEAN_RACECHECK_LOG,
                                                  "sanitizer_racecheck_topk": CLEAN_RACECHECK_LOG},
                                       records=False)
    _, out = _main_json([str(run_path), "--sanitizer-logs", str(log_dir)], capsys)
    assert out["verified"] == [] and all(r["regraded"] is None for r in out["sanitizer_regraded"])
    (log_dir / "sanitizer_racecheck_topk.jsonl").write_text(_test_record(MARGIN_GROUP))  # another group's
    (log_dir / "sanitizer_racecheck_margin.jsonl").write_text(_test_record(MARGIN_GROUP))
    _, out = _main_json([str(run_path), "--sanitizer-logs", str(log_dir)], capsys)
    rows = {r["process"]: r for r in out["sanitizer_regraded"]}
    assert rows["sanitizer_racecheck_topk"]["regraded"] is None and "per-family" in rows["sanitizer_racecheck_topk"]["why_not"]
    assert rows["sanitizer_racecheck_margin"]["regraded"] == "clean"
    # margin_softmax / cosine_topk also ran in the (still misgraded) top-k group
    assert set(out["verified"]) == set(MARGIN_GROUP) - set(TOPK_GROUP)


def test_sanitizer_logs_without_a_log_keep_the_recorded_verdict(tmp_path, capsys):
    run_path, log_dir = _misgraded_run(tmp_path, {"sanitizer_racecheck_topk": CLEAN_RACECHECK_LOG})
    _, out = _main_json([str(run_path), "--sanitizer-logs", str(log_dir)], capsys)
    assert set(out["verified"]) == set(TOPK_GROUP) - set(MARGIN_GROUP)
    assert [r["process"] for r in out["sanitizer_regraded"]] == ["sanitizer_racecheck_topk"]
    assert verify.main([str(run_path), "--sanitizer-logs", str(tmp_path / "nowhere")]) == 2
