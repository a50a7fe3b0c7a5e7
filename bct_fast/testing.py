"""Helpers shared by the test-suite and the benchmarks (and usable by downstream test-suites)."""
from __future__ import annotations

import os

import torch

from bct_fast._core.extension import cuda_kernels_compiled


def cuda_ready() -> bool:
    """A CUDA GPU is visible and bct_fast was built with its CUDA kernels."""
    return torch.cuda.is_available() and cuda_kernels_compiled()


def available_devices() -> list[str]:
    """cpu always; cuda when :func:`cuda_ready`. BCT_FAST_TEST_DEVICE=cpu|cuda restricts the list;
    BCT_FAST_TEST_DEVICE=all lists cuda even without a GPU, so a collection on a CPU machine sees
    every CUDA case a GPU machine would (they are skipped if run)."""
    only = os.environ.get("BCT_FAST_TEST_DEVICE")
    if only == "all":
        return ["cpu", "cuda"]
    devices = ["cpu"] + (["cuda"] if cuda_ready() else [])
    return [d for d in devices if d == only] if only else devices


def skip_cuda_items(items) -> None:
    """pytest hook body: mark every item with the `cuda` marker as skipped when not cuda_ready()."""
    if cuda_ready():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU and bct_fast built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
