"""The device's own floors, measured in the same run as the kernels (benchmarks/NOTES.md takes its
predictions from datasheet numbers; these replace them): a bf16 GEMM (torch.mm 8192^3: the
tensor-core rate cuBLAS reaches), a device-to-device copy of 2 GiB (HBM bandwidth, bytes read +
written), and the same copy of 8 MiB (both buffers fit in the 50 MB L2: an L2 bandwidth estimate,
which decides whether 128 x 128 mma.sync tiles, 64 FLOP per byte loaded, can feed the tensor
cores; NOTES "Fused search"). The figure to read is in ``extra_info`` (``tflops`` or ``tb_per_s``,
from the median time). Run: pytest benchmarks/bench_floors.py -m cuda --benchmark-only
"""
from __future__ import annotations

import pytest
import torch


def _events_ms(fn, reps: int) -> float:
    """Median of ``reps`` event-timed calls after a warm-up (ms)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@pytest.mark.cuda
def test_floor_bf16_gemm(measure, benchmark):
    n = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=gen).bfloat16()  # never zeros: they run faster
    b = torch.randn(n, n, device="cuda", generator=gen).bfloat16()
    ms = _events_ms(lambda: torch.mm(a, b), 20)
    measure(lambda: torch.mm(a, b), "cuda", rounds=5, floor="bf16 mm 8192^3")
    benchmark.extra_info["tflops"] = round(2 * n**3 / ms / 1e9, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("mib", [8, 2048], ids=["8MiB-L2", "2GiB-HBM"])
def test_floor_copy(measure, benchmark, mib):
    n = mib * 2**20 // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    reps = 20 if mib > 64 else 200
    inner = 1 if mib > 64 else 50  # small copies: 50 per timed call, so launch gaps stay small
    def copy():
        for _ in range(inner):
            dst.copy_(src)
    ms = _events_ms(copy, reps)
    measure(copy, "cuda", rounds=5, floor=f"copy {mib} MiB x {inner}")
    benchmark.extra_info["tb_per_s"] = round(2 * n * 4 * inner / ms / 1e9, 2)
