"""benchmarks/gpu_checks.py, the checks behind benchmarks/gpu_session.sh, tested without a GPU:
"green" on a GPU machine must never mean "skipped", and the installed build must be what runs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
gpu_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_checks)


def junit(tmp_path, cases: str, errors: int = 0) -> Path:
    p = tmp_path / "t.xml"
    p.write_text(f'<testsuites><testsuite name="pytest" errors="{errors}" tests="3">{cases}</testsuite></testsuites>')
    return p


CUDA = '<properties><property name="cuda" value="1"/></properties>'
PASSED = f'<testcase classname="tests.ops.test_topk_cuda" name="a" file="tests/ops/test_topk_cuda.py">{CUDA}</testcase>'
SKIPPED = (f'<testcase classname="tests.ops.test_topk_cuda" name="b" file="tests/ops/test_topk_cuda.py">{CUDA}'
           '<skipped message="needs a CUDA GPU"/></testcase>')
CPU_ONLY = '<testcase classname="tests.ops.test_topk" name="c" file="tests/ops/test_topk.py"/>'


def test_skipped_cuda_test_fails_when_a_gpu_is_visible(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    res = gpu_checks.check_cuda_tests(junit(tmp_path, PASSED + SKIPPED + CPU_ONLY))
    assert not res["ok"] and "skipped although a GPU is visible" in res["problems"][0]
    assert res["per_file"] == {"tests/ops/test_topk_cuda.py": {"passed": 1, "failed": 0, "skipped": 1}}


def test_all_cuda_tests_passed_is_green(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    assert gpu_checks.check_cuda_tests(junit(tmp_path, PASSED + CPU_ONLY))["ok"]


def test_no_cuda_test_at_all_fails_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    res = gpu_checks.check_cuda_tests(junit(tmp_path, CPU_ONLY))
    assert not res["ok"] and "no CUDA test ran" in " ".join(res["problems"])


def test_collection_errors_fail(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    assert not gpu_checks.check_cuda_tests(junit(tmp_path, PASSED, errors=1))["ok"]


def test_skips_are_fine_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv(gpu_checks.FAKE_GPU_ENV, raising=False)
    if gpu_checks.gpu_visible():
        pytest.skip("a GPU is visible: the no-GPU branch cannot be exercised here")
    assert gpu_checks.check_cuda_tests(junit(tmp_path, SKIPPED))["ok"]


def test_real_junit_records_the_cuda_marker(tmp_path, monkeypatch):
    """End to end: pytest's own junit XML of a CUDA-marked test file carries the property our
    conftest adds, so the checker counts it (skipped here, without a GPU)."""
    xml = tmp_path / "real.xml"
    env = dict(os.environ, BCT_FAST_TEST_DEVICE="cpu")
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests/ops/test_kernels_small_cuda.py"), "-q",
                    "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={xml}"],
                   cwd=ROOT, env=env, capture_output=True, timeout=300)
    counts = gpu_checks.cuda_test_counts(xml)
    n = sum(sum(r.values()) for r in counts.values())
    assert n >= 8, counts
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    res = gpu_checks.check_cuda_tests(xml)
    if res["total"]["skipped"]:  # this machine has no GPU: exactly the case the checker must fail
        assert not res["ok"]


def test_record_keeps_the_verdicts_of_a_stopped_run(tmp_path, monkeypatch):
    """The .jsonl record (tests/conftest.py) of a real pytest run: every collected CUDA test gets
    a line as it finishes; a record cut short (the deadline) names the unfinished tests and fails
    the check, a half-written last line is ignored."""
    record = tmp_path / "r.jsonl"
    env = dict(os.environ, BCT_FAST_TEST_DEVICE="cpu", BCT_FAST_TEST_RECORD=str(record))
    subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests/ops/test_kernels_small_cuda.py"), "-q",
                    "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    lines = record.read_text().splitlines()
    rec = gpu_checks.read_record(record)
    assert len(rec["collected_cuda"]) >= 8 and set(rec["collected_cuda"]) == rec["cuda"]
    counts, unfinished, errors = gpu_checks.record_counts(rec)
    assert unfinished == [] and errors == 0
    assert sum(sum(r.values()) for r in counts.values()) == len(rec["collected_cuda"])
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    res = gpu_checks.check_cuda_tests(cut)
    assert not res["ok"] and res["unfinished"] == len(rec["collected_cuda"]) - 2
    assert "did not finish" in " ".join(res["problems"])


def test_record_takes_the_worst_phase(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_checks.FAKE_GPU_ENV, "1")
    rows = [{"collected": 2, "collected_cuda": {"t.py::a": ["f1"], "t.py::b": ["f1", "f2"]}},
            {"nodeid": "t.py::a", "when": "call", "outcome": "passed", "cuda": True},
            {"nodeid": "t.py::a", "when": "teardown", "outcome": "failed", "cuda": True},
            {"nodeid": "t.py::b", "when": "call", "outcome": "passed", "cuda": True}]
    record = tmp_path / "r.jsonl"
    record.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = gpu_checks.check_cuda_tests(record)
    assert not res["ok"] and res["total"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert res["per_family"] == {"f1": {"passed": 1, "failed": 1, "skipped": 0, "unfinished": 0},
                                 "f2": {"passed": 1, "failed": 0, "skipped": 0, "unfinished": 0}}
    assert not gpu_checks.check_cuda_tests(tmp_path / "missing.jsonl")["ok"]


@pytest.mark.parametrize("log,rc,verdict", [
    ("========= ERROR SUMMARY: 0 errors\n", 0, "clean"),
    ("========= Invalid __global__ write of size 4\n========= ERROR SUMMARY: 3 errors\n", 1, "errors"),
    ("========= Error: Device not supported\n", 1, "refused"),
    ("Traceback ...\n", 1, "failed"),
    ("========= ERROR SUMMARY: 0 errors\n", 1, "failed"),  # tests failed under the sanitizer
    # racecheck's own summary line (the lease of 2026-11-26 10:08 UTC printed the first one and
    # the parser of the time called it "failed")
    ("18 passed in 66.17s (0:01:06)\n"
     "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0, "clean"),
    ("========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n", 1, "errors"),
    ("========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)\n", 0, "errors"),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 1, "failed"),
    # two summary lines (a target starting several processes): any count > 0 is an error
    ("========= ERROR SUMMARY: 0 errors\n========= ERROR SUMMARY: 2 errors\n", 1, "errors"),
])
def test_sanitizer_verdicts(log, rc, verdict):
    assert gpu_checks.sanitizer_verdict(log, rc) == verdict


@pytest.mark.parametrize("log,rc", [
    ("..........  [100%]\n18 passed in 66.17s (0:01:06)\n========= RACECHECK SUMMARY: 0 hazards\n", 0),
    ("11 passed, 2 deselected in 3.87s\n", 0),
    ("============ 17 passed, 1 skipped in 4.00s ============\n", 0),
    ("FAILED tests/x.py::a\n1 failed, 17 passed in 13.74s\n", 1),
    ("============ 17 passed, 1 error in 4.00s ============\n", 1),
    ("..........\n", None),  # cut off before pytest's summary
    ("collected 0 items\n============ no tests ran in 0.01s ============\n", None),
    ("3 skipped in 1.00s\n", None),  # nothing passed: nothing shown clean
    ("18 passed in 6.1s\nSegmentation fault\n========= Target application returned an error\n", 1),
])
def test_pytest_exit_code_from_its_summary_line(log, rc):
    assert gpu_checks.pytest_exit_code(log) == rc


def test_the_sanitizer_check_records_the_exit_code(tmp_path):
    log = tmp_path / "s.log"
    log.write_text("3 passed in 1.0s\n========= ERROR SUMMARY: 0 errors\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_checks.py"), "sanitizer",
                          str(log), "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": True, "verdict": "clean", "rc": 0}


def test_cmake_floor_is_read_from_pyproject():
    assert gpu_checks.cmake_floor() >= (3, 26, 0)
    assert gpu_checks._version_tuple("cmake version 4.1.2\n") == (4, 1, 2)


def test_source_folder_shadowing_the_build_is_caught(monkeypatch):
    """Negative control: with the source tree forced onto sys.path (what `python -m pytest` from
    the repository root does) the check must fail, naming the source folder."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    res = gpu_checks.check_installed(ROOT, need_cuda=False)
    assert not res["ok"]
    assert any("source folder" in p for p in res["problems"]), res


NCU_CSV = '''==PROF== Connected to process 123 (/opt/torch/.venv/bin/python3.12)
==PROF== Profiling "topk_fused_partial_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","lts__t_sector_hit_rate.pct","dram__bytes_read.sum"
"","","","","","","","","","","","nsecond","%","byte"
"0","123","python3.12","h","topk_fused_partial_kernel<128, true>","1","7","(256, 1, 1)","(32, 4, 1)","0","9.0","1,000","80.5","2,048"
"1","123","python3.12","h","topk_fused_partial_kernel<128, true>","1","7","(256, 1, 1)","(32, 4, 1)","0","9.0","3,000","90.5","4,096"
"2","123","python3.12","h","topk_fused_merge_kernel","1","7","(128, 1, 1)","(4096, 1, 1)","0","9.0","500","n/a","0"
'''


def test_ncu_summary_averages_each_kernels_metrics(tmp_path):
    f = tmp_path / "ncu_search_fused.csv"
    f.write_text(NCU_CSV)
    res = gpu_checks.ncu_summary([f])
    assert res["ok"] and res["problems"] == []
    part = res["workloads"]["ncu_search_fused"]["topk_fused_partial_kernel<128, true>"]
    assert part["launches"] == 2
    assert part["mean"] == {"gpu__time_duration.sum": 2000.0, "lts__t_sector_hit_rate.pct": 85.5,
                            "dram__bytes_read.sum": 3072.0}
    assert part["units"]["gpu__time_duration.sum"] == "nsecond"
    merge = res["workloads"]["ncu_search_fused"]["topk_fused_merge_kernel"]
    assert merge["mean"] == {"gpu__time_duration.sum": 500.0, "dram__bytes_read.sum": 0.0}  # n/a skipped


def test_ncu_summary_reports_a_missing_table(tmp_path):
    f = tmp_path / "ncu_margin_fused.csv"
    f.write_text("==ERROR== Failed to find metric foo\n")
    res = gpu_checks.ncu_summary([f, tmp_path / "absent.csv"])
    assert not res["ok"] and len(res["problems"]) == 2
