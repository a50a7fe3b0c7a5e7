"""The library's GEMM helpers: ``a @ b.T`` for fp32 CPU tensors through oneDNN when that is
exact and available, and :func:`mm_f32` (bf16 operands, fp32 products on any device).

PyTorch's CPU ``mm`` calls MKL, which takes its AVX2 code path on non-Intel CPUs; oneDNN (also
inside every x86 PyTorch wheel) dispatches by instruction set and runs the same fp32 GEMM about
2x faster on an AVX-512 AMD EPYC (benchmarks/NOTES.md). It is reached through
``torch.ops.mkldnn._linear_pointwise``, a private op (Inductor's CPU linear), so it is probed
once: absent, failing, or off by more than fp32 rounding, ``mm`` is used instead.
``BCT_FAST_ONEDNN=0`` turns it off.
"""
from __future__ import annotations

import os

import torch

_state: dict[str, bool] = {}
# Below ~2M multiply-adds oneDNN's per-call overhead (~8 us) outweighs its faster kernel.
_MIN_MACS = 1 << 21


def _probe() -> bool:
    if os.environ.get("BCT_FAST_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(37, 129, generator=gen)
        b = torch.randn(53, 129, generator=gen)
        got = op(a, b, None, "none", [], "")
        ref = (a.double() @ b.double().T)
        scale = a.double().norm(dim=1, keepdim=True) * b.double().norm(dim=1)
        # fp32 accumulation of 129 terms: well under 1e-5 of |a||b|; bf16 math would be ~1e-3.
        return got.shape == ref.shape and bool(((got.double() - ref).abs() / scale).max() < 1e-5)
    except Exception:  # noqa: BLE001 - any failure of a private op means "use mm"
        return False


def onednn_active() -> bool:
    """Whether fp32 CPU products go through oneDNN (probed once per process)."""
    if "onednn" not in _state:
        _state["onednn"] = _probe()
    return _state["onednn"]


def _routed(a: torch.Tensor, b: torch.Tensor, macs: int) -> bool:
    # The op has no autograd formula: a product that autograd must differentiate stays on mm.
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and macs >= _MIN_MACS
            and not needs_grad and onednn_active())


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` ([M, K] x [N, K] -> [M, N]); oneDNN for fp32 CPU tensors, else ``mm``.

    ``b`` may be a transposed view (``mm_nt(p, w.T)`` is ``p @ w``); a non-contiguous ``a`` is
    slow in oneDNN, so pass it contiguous."""
    if _routed(a, b, a.shape[0] * b.shape[0] * a.shape[1]):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.T @ b`` ([K, M] x [K, N] -> [M, N]), e.g. a weight gradient ``p.T @ x``."""
    if _routed(a, b, a.shape[1] * b.shape[1] * a.shape[0]):
        # oneDNN reads a transposed left operand slowly; one copy of it is cheaper.
        return torch.ops.mkldnn._linear_pointwise(a.T.contiguous(), b.T, None, "none", [], "")
    return a.T @ b


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 with a, b in the operand dtype: cuBLAS bf16 x bf16 -> fp32 on CUDA (tensor
    cores, fp32 accumulation); elsewhere the bf16 values are upcast (exact products, fp32 sums:
    the same arithmetic)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        # A torch without mm(out_dtype=), or a build that refuses bf16 -> fp32 (ROCm): the exact
        # upcast, slower, the same arithmetic.
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a.float(), b.float())
