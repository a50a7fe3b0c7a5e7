"""The shared memory the fused tensor-core kernels need per thread block, and what a CUDA device
allows one block (with the opt-in). Their launchers refuse a device that allows less; the
providers ask here first so that ``backend="auto"`` takes another provider instead of raising
(an A100 allows 163 KiB, sm_86 / sm_89 / sm_120 parts 99 KiB; the H100 / H200 227 KiB).

The byte counts are the kernels' ``kSmemBytes`` (csrc/cuda/topk_fused_kernels.cuh,
margin_fused_kernels.cuh, margin_fused_pws_kernels.cuh);
``tests/ops/test_bindings_emulated.py`` checks each one against the C++ launchers (emulated: a
launch succeeds with exactly that much and is refused with one byte less).
"""
from __future__ import annotations

import functools

import torch

# Fused search: per list size KMAX (k <= 32 / 64 / 128).
TOPK_FUSED_SMEM = {32: 150544, 64: 162832, 128: 228368}
# Fused loss forward, log-sum-exp only (trainable classifier).
MARGIN_FUSED_LSE_SMEM = 81920
# Opt-in limit by compute capability, for a torch whose device properties lack the field.
_OPTIN_BY_CAPABILITY = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 7): 163 * 1024,
                        (9, 0): 227 * 1024, (10, 0): 227 * 1024, (10, 3): 227 * 1024}
_OPTIN_DEFAULT = 99 * 1024  # sm_86, sm_89, sm_120 and anything unknown: the smallest sm_80+ figure


def topk_fused_kmax(k: int) -> int:
    """The list size the fused search kernel is instantiated with for ``k`` (<= 128)."""
    return 32 if k <= 32 else 64 if k <= 64 else 128


def margin_fused_pws_smem(d: int) -> int:
    """Bytes of the frozen-classifier forward kernel (lse + pws) for depth ``d`` <= 512: x and
    two w tiles of 64 rows at a pitch of the padded depth (64 / 128 / 256 / 512) + 8, the P tile,
    row data and reduction scratch."""
    dp = 64 if d <= 64 else 128 if d <= 128 else 256 if d <= 256 else 512
    return 3 * 64 * (dp + 8) * 2 + 64 * 72 * 2 + 3 * 64 * 4 + 2 * 4 * 64 * 4


@functools.lru_cache(maxsize=None)
def _optin_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value)
    return _OPTIN_BY_CAPABILITY.get(torch.cuda.get_device_capability(index), _OPTIN_DEFAULT)


def optin_smem(device: torch.device) -> int | None:
    """Shared memory one block may use on ``device`` with the opt-in (None: not a CUDA device)."""
    if device.type != "cuda":
        return None
    return _optin_of(device.index if device.index is not None else torch.cuda.current_device())


def smem_shortfall(device: torch.device, need: int, what: str) -> str | None:
    """Why ``device`` cannot run a kernel needing ``need`` bytes per block, or None."""
    have = optin_smem(device)
    if have is None or need <= have:
        return None
    return (f"{what} needs {need} bytes of shared memory per block and this GPU allows {have} "
            f"(an sm_90 part allows 232448)")
