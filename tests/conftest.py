"""Shared fixtures: available devices, fresh random seeds, the `cuda` marker."""
from __future__ import annotations

import os

import pytest
import torch

from bct_fast.testing import available_devices, skip_cuda_items  # noqa: F401  (re-exported to tests)


def pytest_collection_modifyitems(config, items):
    skip_cuda_items(items)


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
    from bct_fast import _cpu_gemm

    if request.param == "onednn" and not _cpu_gemm._probe():
        pytest.skip("oneDNN's fp32 linear is not available in this torch build")
    monkeypatch.setitem(_cpu_gemm._state, "onednn", request.param == "onednn")
    return request.param


@pytest.fixture(params=["native", "torch"])
def cpu_select(request, monkeypatch) -> str:
    """Run a CPU search test once with the C++ running top-k and once with the PyTorch one."""
    from bct_fast import _native

    monkeypatch.setattr(_native, "USE_CPU_SELECT", request.param == "native")
    if request.param == "native" and not _native.cpu_select_available():
        pytest.fail("the extension's TopkSelector is missing (bct_fast._C not built?)")
    return request.param
