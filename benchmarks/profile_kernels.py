"""Workloads for Nsight Compute (gpu_session.sh, step "profile"): one representative call of each
provider, so ncu can read the counters that decide the next design step (benchmarks/NOTES.md):
L2 hit rate and bytes (do the epilogue providers' score blocks stay in L2? can L2 feed the
128 x 128 mma.sync tiles?), tensor-pipe activity and DRAM traffic.

    python benchmarks/profile_kernels.py WORKLOAD     # margin_epilogue | margin_fused |
                                                      # search_fused | search_epilogue

Runs the kernels on request (``backend=``), whatever ``gpu_verified.json`` says. bf16 inputs,
d = 512; shapes a fraction of the benchmark's goal rows so ncu's kernel replays stay short (each
per-chunk kernel sees the same block shapes as at the goal rows).
"""
from __future__ import annotations

import sys

import torch

WORKLOADS = ("margin_epilogue", "margin_fused", "search_fused", "search_epilogue")


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, d, device="cuda", generator=gen).bfloat16()  # never zeros


def run(workload: str) -> None:
    from bct_fast.ops import cosine_margin_cross_entropy
    from bct_fast.search import cosine_topk

    d = 512
    if workload.startswith("margin"):
        B, C = 1024, 32_768  # 8 class chunks of the epilogue provider: forward and backward fit -c 30
        x, w = _rows(B, d, 1).requires_grad_(True), _rows(C, d, 2).requires_grad_(True)
        y = torch.randint(0, C, (B,), device="cuda")
        backend = workload.split("_")[1]

        def loss(w_):
            return cosine_margin_cross_entropy(x, w_, y, scale=64.0, margin_type="cosface", margin=0.35,
                                               backend=backend)

        if backend == "epilogue":
            loss(w).backward()  # trainable: forward lse sweep, backward grads sweep
        else:
            with torch.no_grad():
                loss(w)  # the lse-only fused kernel
            loss(w.detach()).backward()  # frozen classifier: the fused lse + pws kernel
    else:
        q, g = _rows(4096, d, 3), _rows(1_000_000, d, 4)
        cosine_topk(q, g, 100, normalize=True, backend=workload.split("_")[1])
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in WORKLOADS:
        print(f"usage: profile_kernels.py {{{' | '.join(WORKLOADS)}}}", file=sys.stderr)
        return 2
    run(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
