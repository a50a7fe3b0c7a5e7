"""Shared fixtures: available devices, fresh random seeds, the `cuda` marker."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bct_fast.testing import skip_cuda_items


# gpu_session.sh: a JSON-lines file that gets one line per finished test as it finishes (and the
# collected CUDA tests first), so a run stopped by its deadline still leaves every verdict so far
# (junit XML is written only at the end). Read by benchmarks/gpu_checks.py.
RECORD_ENV = "BCT_FAST_TEST_RECORD"
UNDECLARED = "undeclared"  # the families of a CUDA test whose file has no KERNEL_FAMILIES


def pytest_report_header(config):
    """Which bct_fast is under test: a source folder shadowing the installed build shows here."""
    import bct_fast

    info = bct_fast.build_info()
    return [f"bct_fast: {bct_fast.__file__}",
            f"bct_fast build: extension_loaded={info['extension_loaded']} cuda_compiled={info['cuda_compiled']} "
            f"archs={info['cuda_architectures']} cuda_available={info['torch_cuda_available']}"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)  # so `-m cuda` selects every CUDA case
        if "cuda" in item.keywords:  # junit XML records it: a GPU run's checker counts CUDA tests
            item.user_properties.append(("cuda", "1"))
            # Which kernel families the test exercises (benchmarks/verify_gpu_run.py), declared per
            # file. A file without the declaration is recorded as "undeclared", which keeps a GPU
            # run from verifying anything (never a collection error: that would cost a lease);
            # tests/build/test_verify_gpu_run.py fails CI on it first.
            families = getattr(item.module, "KERNEL_FAMILIES", None)
            item.user_properties.append(("families", ",".join(families) if families is not None
                                         else UNDECLARED))
    skip_cuda_items(items)


def _record(line: dict) -> None:
    with open(os.environ[RECORD_ENV], "a") as f:
        f.write(json.dumps(line) + "\n")


def pytest_collection_finish(session):
    if os.environ.get(RECORD_ENV):
        cuda = {i.nodeid: [f for f in dict(i.user_properties)["families"].split(",") if f]
                for i in session.items if ("cuda", "1") in i.user_properties}
        _record({"collected": len(session.items), "collected_cuda": cuda})


def pytest_collectreport(report):
    if os.environ.get(RECORD_ENV) and report.failed:
        _record({"collect_error": report.nodeid})


def pytest_runtest_logreport(report):
    # One line per test: its call, or the setup / teardown that failed or skipped it.
    if not os.environ.get(RECORD_ENV):
        return
    if report.when == "call" or report.outcome != "passed":
        _record({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "cuda": ("cuda", "1") in report.user_properties,
                 "families": dict(report.user_properties).get("families", ""),
                 "duration_s": round(report.duration, 3)})


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed, so a failure can be replayed with torch.manual_seed)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed = {s}")
    return s


@pytest.fixture(params=["onednn", "mm"])
def cpu_gemm(request, monkeypatch) -> str:
    """Run a CPU test once through oneDNN products (where available) and once through torch.mm."""
    from bct_fast.ops import cpu_gemm as _cpu_gemm

    if request.param == "onednn" and not _cpu_gemm._probe():
        pytest.skip("oneDNN's fp32 linear is not available in this torch build")
    monkeypatch.setitem(_cpu_gemm._state, "onednn", request.param == "onednn")
    return request.param


@pytest.fixture(params=["native", "torch", "device"])
def cpu_select(request, monkeypatch) -> str:
    """Run a CPU search test with the C++ running top-k, the PyTorch one, and the fixed-shape
    one a GPU uses (topk_select.DeviceRunningTopk, deferred non-finite check), forced on CPU."""
    from bct_fast.ops import topk, topk_select

    monkeypatch.setattr(topk_select, "USE_CPU_SELECT", request.param == "native")
    if request.param == "device":
        monkeypatch.setattr(topk, "_sync_free", lambda q, acc, N: acc == torch.float32
                            and N - 1 <= topk_select.MAX_COMPOSITE_INDEX)
    if request.param == "native" and not topk_select.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing (bct_fast._C not built?)")
    return request.param
