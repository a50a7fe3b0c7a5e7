"""Where a provider's time goes (gpu_session.sh, step "trace"): is a chunk loop host-bound?

The first GPU run (benchmarks/results/gpu_2026-11-26_h200.md) measured the epilogue search at
585 ms for 12,210 (GEMM + selection) iterations, ~48 us each, against ~20 us of GPU work by the
arithmetic; the trainable margin backward at ~44 ms against ~15 ms. If the Python loops cannot
issue work as fast as the GPU does it, bigger blocks or fewer launches are the remedy; if the GPU
is busy, the kernels are. This script answers it per workload: the wall time of a plain call,
the summed GPU kernel time of a profiled call (torch.profiler), their ratio (``gpu_busy``), the
kernel launches, and the top operators by GPU and by host time.

    python benchmarks/trace_providers.py OUT.json [WORKLOAD ...]

Workloads (bf16, d = 512, a fraction of the goal rows with the same per-iteration block shapes):
search_{epilogue,fused,torch} (Q = 2048, N = 2M, k = 100) and margin_{fused,epilogue,torch}_
{trainable,frozen} (B = 1024, C = 256k, forward + backward). The kernels run on request
(``backend=``), whatever gpu_verified.json says.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Callable

import torch

SEARCH = tuple(f"search_{p}" for p in ("epilogue", "fused", "torch"))
MARGIN = tuple(f"margin_{p}_{c}" for p in ("fused", "epilogue", "torch") for c in ("trainable", "frozen"))
WORKLOADS = SEARCH + MARGIN
TOP = 12


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, d, device="cuda", generator=gen).bfloat16()


def make(workload: str) -> Callable[[], None]:
    """One call of the workload (inputs made once, outside the timed call)."""
    from bct_fast.ops import cosine_margin_cross_entropy
    from bct_fast.search import cosine_topk

    d = 512
    if workload in SEARCH:
        q, g = _rows(2048, d, 1), _rows(2_000_000, d, 2)
        backend = workload.split("_")[1]
        return lambda: cosine_topk(q, g, 100, normalize=True, backend=backend)
    _, backend, classifier = workload.split("_")
    B, C = 1024, 262_144
    x = _rows(B, d, 3).requires_grad_(True)
    w = _rows(C, d, 4).requires_grad_(classifier == "trainable")
    y = torch.randint(0, C, (B,), device="cuda")

    def step() -> None:
        loss = cosine_margin_cross_entropy(x, w, y, scale=64.0, margin_type="cosface", margin=0.35,
                                           backend=backend)
        loss.backward()
        x.grad = w.grad = None
    return step


def _device_us(e) -> float:
    """Self GPU time of a profiler row, in us (torch >= 2.5 says device, older cuda)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(e, name, None)
        if v is not None:
            return float(v)
    return 0.0


def _on_gpu(e) -> bool:
    """A profiler event that ran on the GPU (a kernel, memcpy or memset), not a host operator."""
    return str(getattr(e, "device_type", "")).endswith("CUDA")


def summarize(prof, wall_ms: float) -> dict:
    """The figures of one profiled call (see the module docstring); works on a CPU-only profile
    too (GPU time 0), which is how tests/build checks it."""
    rows = [e for e in prof.key_averages() if e.key]
    # Kernel rows only: an operator's row also carries the GPU time of the kernels it launched,
    # so summing every row would count each kernel twice (torch's own table total sums these).
    gpu_ms = sum(_device_us(e) for e in rows if _on_gpu(e)) / 1e3
    kernels = sum(1 for e in prof.events() if _on_gpu(e))

    def top(key: Callable, n: int = TOP) -> list[dict]:
        return [{"op": e.key[:120], "count": e.count, "self_gpu_ms": round(_device_us(e) / 1e3, 3),
                 "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)}
                for e in sorted(rows, key=key, reverse=True)[:n] if key(e) > 0]

    return {"wall_ms": round(wall_ms, 3), "gpu_kernel_ms": round(gpu_ms, 3),
            "gpu_busy": round(gpu_ms / wall_ms, 3) if wall_ms > 0 else None,
            "kernel_launches": kernels,
            "top_gpu": top(_device_us), "top_cpu": top(lambda e: e.self_cpu_time_total)}


def trace(fn: Callable[[], None], activities, sync: Callable[[], None]) -> dict:
    """Warm up, time one plain call (median of 3), then profile one call."""
    fn()
    sync()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    wall_ms = sorted(times)[1]
    try:
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync()
    except Exception as e:  # no CUPTI on the machine, say: the wall time still tells something
        return {"wall_ms": round(wall_ms, 3), "profile_error": f"{type(e).__name__}: {e}"[:300]}
    return summarize(prof, wall_ms)


def host_us_per_op(device: str = "cuda", ops: int = 2000) -> dict:
    """The host's cost of one small tensor op and of one small matmul (us, median of 3 timings of
    ``ops`` calls each, synchronized once at the end): what each launch of a chunk loop costs
    before the GPU does anything."""
    a = torch.ones(256, device=device)
    m = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
    out = {}
    for name, fn in (("add", lambda: a.add_(1.0)), ("mm_bf16", lambda: torch.mm(m, m))):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(ops):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / ops * 1e6)
        out[name] = round(sorted(times)[1], 2)
    return out


def _write(path: str, out: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if not argv or any(w not in WORKLOADS for w in argv[1:]):
        print(f"usage: trace_providers.py OUT.json [{' | '.join(WORKLOADS)} ...]", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("trace_providers.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    out = {"device": torch.cuda.get_device_name(), "host_us_per_op": host_us_per_op(), "workloads": {}}
    for w in argv[1:] or WORKLOADS:
        try:
            out["workloads"][w] = trace(make(w), acts, torch.cuda.synchronize)
        except Exception as e:  # one broken workload must not hide the others
            out["workloads"][w] = {"error": f"{type(e).__name__}: {e}"[:500]}
        torch.cuda.empty_cache()
        _write(argv[0], out)  # after every workload: a timeout keeps what is done
        print(w, {k: v for k, v in out["workloads"][w].items() if not k.startswith("top")}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
