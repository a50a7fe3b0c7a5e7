"""Benchmark helpers: device selection, synchronised timing targets, peak-memory probes.

Run: pytest benchmarks --benchmark-only [--benchmark-json=out.json]. CUDA cases carry the
`cuda` marker and are skipped without a GPU + compiled kernels.
"""
from __future__ import annotations

import ctypes
import gc
import re

import pytest
import torch

from bct_fast.testing import skip_cuda_items


def pytest_collection_modifyitems(config, items):
    skip_cuda_items(items)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory allocated by one call of ``fn`` beyond what was live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the resident-set high-water mark, reset
    through /proc/self/clear_refs, so it counts every allocator, not just torch's."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:  # hand freed heap pages back to the OS so the high-water mark sees new allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


@pytest.fixture
def measure(benchmark):
    """measure(fn, device, rounds): time ``fn`` (synchronised) and record its peak extra memory."""

    def run(fn, device: str, rounds: int = 3, **info):
        def target():
            fn()
            sync(device)

        benchmark.extra_info.update(info, device=device)
        benchmark.extra_info["peak_extra_mib"] = round(peak_extra_bytes(target, device) / 2**20, 1)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)

    return run
