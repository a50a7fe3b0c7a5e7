"""Shared fixtures: available devices, fresh random seeds, the `cuda` marker."""
from __future__ import annotations

import os

import pytest
import torch

from bct_fast._backend import cuda_kernels_compiled


def cuda_ready() -> bool:
    return torch.cuda.is_available() and cuda_kernels_compiled()


def available_devices() -> list[str]:
    """cpu always; cuda when a GPU and the compiled kernels are both present.
    BCT_FAST_TEST_DEVICE=cpu|cuda restricts the list."""
    devices = ["cpu"] + (["cuda"] if cuda_ready() else [])
    only = os.environ.get("BCT_FAST_TEST_DEVICE")
    return [d for d in devices if d == only] if only else devices


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and bct_fast built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed, so a failure can be replayed with torch.manual_seed)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed = {s}")
    return s
