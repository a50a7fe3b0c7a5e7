"""benchmarks/gpu_run_report.py: one page from a GPU run's JSON (checked on the committed first
run and on a synthetic grouped-sanitizer run with a trace)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_run_report", ROOT / "benchmarks" / "gpu_run_report.py")
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)


def test_the_first_h200_run(tmp_path):
    run = ROOT / "benchmarks" / "results" / "gpu_20261126T014517Z.json"
    out = tmp_path / "report.md"
    assert rep.main([str(run), "--out", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H200" in text and "margin_softmax: passed 127 / failed 25" in text
    assert "sanitizer_racecheck: **failed**" in text and "**verified**" not in text
    assert "floor_bf16_gemm" in text and "bct_fast_epilogue" in text


def test_grouped_sanitizer_and_trace(tmp_path):
    run = {"date": "2026-12-01", "commit": "abc", "machine": {"gpu": {"name": "NVIDIA H100"}},
           "steps": {"trace": "0"},
           "sanitizer_racecheck_topk": {"verdict": "clean", "per_family": {"topk_fused": {"passed": 3}}},
           "trace_providers": {"host_us_per_op": {"add": 4.1, "mm_bf16": 7.9}, "workloads": {
               "search_epilogue": {"wall_ms": 120.0, "gpu_kernel_ms": 50.0, "gpu_busy": 0.417,
                                   "kernel_launches": 980, "top_gpu": [{"op": "topk_select_kernel"}]},
               "search_fused": {"error": "RuntimeError: boom"}}}}
    text = rep.report(run)
    assert "sanitizer_racecheck_topk: **clean**" in text and "topk_fused: passed 3" in text
    assert "| search_epilogue | 120.0 | 50.0 | 0.417 | 980 | topk_select_kernel |" in text
    assert "error: RuntimeError: boom" in text and "'mm_bf16': 7.9" in text
    assert "not verified" in text  # no tests, no memcheck: nothing verifies


def test_unreadable_json_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "gpu_x.json"
    bad.write_text("{")
    assert rep.main([str(bad)]) == 2 and "cannot read" in capsys.readouterr().err
