"""benchmarks/trace_providers.py (gpu_session.sh, step "trace"): its summary, checked on a CPU
profile (no GPU here: GPU time 0), and its refusals."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("trace_providers", ROOT / "benchmarks" / "trace_providers.py")
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)


def test_summary_of_a_cpu_profile():
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    out = tp.trace(lambda: (a @ b).relu_(), [torch.profiler.ProfilerActivity.CPU], lambda: None)
    assert out["wall_ms"] > 0 and out["gpu_kernel_ms"] == 0 and out["gpu_busy"] == 0
    assert out["kernel_launches"] == 0 and out["top_gpu"] == []
    ops = [r["op"] for r in out["top_cpu"]]
    assert any("mm" in op for op in ops) and any("relu" in op for op in ops)
    assert all(r["count"] >= 1 and r["self_cpu_ms"] >= 0 for r in out["top_cpu"])


def test_refuses_unknown_workloads_and_a_machine_without_gpu(capsys):
    assert tp.main([]) == 2
    assert tp.main(["out.json", "search_nonsense"]) == 2
    if not torch.cuda.is_available():
        assert tp.main(["out.json", "search_epilogue"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_every_workload_names_a_backend_the_ops_accept():
    from bct_fast.ops.providers import BACKENDS

    for w in tp.WORKLOADS:
        assert w.split("_")[1] in BACKENDS


def test_a_profiler_failure_keeps_the_wall_time(monkeypatch):
    class Broken:
        def __init__(self, **kw):
            raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(tp.torch.profiler, "profile", Broken)
    out = tp.trace(lambda: None, [], lambda: None)
    assert out["wall_ms"] >= 0 and "CUPTI" in out["profile_error"]


def test_host_cost_per_op_on_cpu():
    out = tp.host_us_per_op("cpu", ops=50)
    assert set(out) == {"add", "mm_bf16"} and all(v > 0 for v in out.values())


def test_gpu_time_counts_kernel_rows_only():
    """An operator row carries its kernels' GPU time too: the total must not count it twice."""
    from types import SimpleNamespace as Row

    op = Row(key="aten::mm", count=3, self_device_time_total=900.0, self_cpu_time_total=60.0,
             device_type="DeviceType.CPU")
    kernel = Row(key="sm90_gemm", count=3, self_device_time_total=900.0, self_cpu_time_total=0.0,
                 device_type="DeviceType.CUDA")
    prof = Row(key_averages=lambda: [op, kernel], events=lambda: [kernel] * 3)
    out = tp.summarize(prof, wall_ms=2.0)
    assert out["gpu_kernel_ms"] == 0.9 and out["gpu_busy"] == 0.45 and out["kernel_launches"] == 3
    assert [r["op"] for r in out["top_gpu"]] == ["aten::mm", "sm90_gemm"]
