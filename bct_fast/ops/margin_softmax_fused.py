"""The "fused" provider of the margin-softmax sweeps: tensor-core tiles, statistics in registers.

Same contract as :mod:`bct_fast.ops.margin_softmax_torch`. The forward statistics come from the
fused kernel family (csrc/cuda/margin_fused*, contract in csrc/include/bct_fast/margin_fused.h),
mma.sync bf16 tiles with fp32 accumulation; the B x C score matrix is never written:

- without ``with_pws`` (the trainable classifier's forward): the scale / inverse norms / target
  column / online max-sum-exp applied to the accumulators; class ranges split over blocks and a
  second small kernel merges the per-split (m, l).
- with ``with_pws`` (a frozen classifier's forward; d <= ``margin_fused_pws_max_d`` = 512): one
  kernel computes S = x w^T and O = P' @ W on tensor cores (docs/design_fused_frozen_forward.md,
  v1): P' = exp(z - m) * inv_nw in bf16 like the epilogue provider's e block, the target
  column's term added in fp32 by the split merge (see margin_softmax_epilogue's module
  docstring for why). Larger d goes to the epilogue provider.

The backward is not fused yet: the epilogue provider's
(:mod:`bct_fast.ops.margin_softmax_epilogue`), which has the same contract.

bfloat16 operands on CUDA devices of compute capability 8.0 or newer only; there is no CPU twin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bct_fast._core.extension import native
from bct_fast.ops import device_limits, margin_softmax_epilogue
from bct_fast.ops.native_call import DTYPE_CODES, f32, stream_of
from bct_fast.ops.providers import Unsupported

softmax_grads = margin_softmax_epilogue.softmax_grads  # not fused yet: the epilogue provider's


def unsupported(x: Tensor, w: Tensor) -> Unsupported | None:
    """Why this provider cannot serve these tensors, or None."""
    if x.device.type != "cuda":
        return Unsupported(f"tensors on {x.device} (the fused kernels are CUDA only)")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return Unsupported(f"dtypes {x.dtype} / {w.dtype} (the fused kernels take bfloat16 for both)",
                           expected=True)
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return Unsupported("a GPU older than compute capability 8.0 (bf16 mma.sync needs sm_80)")
    short = device_limits.smem_shortfall(x.device, device_limits.MARGIN_FUSED_LSE_SMEM,
                                         "the fused loss kernel")
    if short is not None:
        return Unsupported(short, expected=True)
    return None


def _pws_fused(x: Tensor, d: int) -> bool:
    """Whether the fused lse + pws kernel serves depth ``d`` on x's device (else the epilogue
    provider's sweep computes pws): d <= 512 and the device's shared memory holds its tiles."""
    if d > native().margin_fused_pws_max_d:
        return False
    return device_limits.smem_shortfall(x.device, device_limits.margin_fused_pws_smem(d), "") is None


def softmax_stats(x: Tensor, w: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
                  scale: float, with_pws: bool, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Over each row's non-target columns: the log-sum-exp of the logits (float64) and, with
    ``with_pws``, sum_j softmax_ij * w_hat_j (fp32 [B, d]; fused where :func:`_pws_fused`
    says so -- d <= 512 and the device's shared memory holds the tiles, d <= 128 on a 99 KiB
    part -- else the epilogue provider's sweep). ``chunk`` is only used by the epilogue provider."""
    why = unsupported(x, w)
    if why is not None:
        raise ValueError(f"x, w: the fused provider cannot serve them: {why.reason}")
    mod = native()
    if with_pws and not _pws_fused(x, x.shape[1]):
        return margin_softmax_epilogue.softmax_stats(x, w, inv_nx, inv_nw, labels, scale,
                                                     with_pws, chunk)
    x, w = x.contiguous(), w.contiguous()
    inv_nx, inv_nw = f32(inv_nx), f32(inv_nw)
    labels = labels.to(torch.int64).contiguous()
    B, d = x.shape
    C = w.shape[0]
    if with_pws:
        return _lse_pws(mod, x, w, inv_nx, inv_nw, labels, scale)
    splits = mod.margin_fused_default_splits(B, C)
    floats = mod.margin_fused_workspace_floats(B, splits)
    workspace = torch.empty(floats, device=x.device, dtype=torch.float32)
    lse = torch.empty(B, device=x.device, dtype=torch.float64)
    with torch.cuda.device(x.device):
        mod.margin_fused_lse(x.data_ptr(), w.data_ptr(), DTYPE_CODES[x.dtype], B, C, d, inv_nx.data_ptr(),
                             inv_nw.data_ptr(), labels.data_ptr(), float(scale),
                             splits, workspace.data_ptr(), floats, lse.data_ptr(), stream_of(x))
    return lse, x.new_empty((0,), dtype=torch.float32)


def _lse_pws(mod, x: Tensor, w: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
             scale: float) -> tuple[Tensor, Tensor]:
    B, d = x.shape
    C = w.shape[0]
    splits = mod.margin_fused_pws_default_splits(B, C)
    floats = mod.margin_fused_pws_workspace_floats(B, d, splits)
    workspace = torch.empty(floats, device=x.device, dtype=torch.float32)
    lse = torch.empty(B, device=x.device, dtype=torch.float64)
    pws = torch.empty(B, d, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        mod.margin_fused_lse_pws(x.data_ptr(), w.data_ptr(), DTYPE_CODES[x.dtype], B, C, d, inv_nx.data_ptr(),
                                 inv_nw.data_ptr(), labels.data_ptr(), float(scale),
                                 splits, workspace.data_ptr(), floats, lse.data_ptr(), pws.data_ptr(),
                                 stream_of(x))
    return lse, pws


def _tile_check(launcher: str, names: tuple[str, str], a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Runs one of the one-warp tile checks of margin_fused.h on 16 x 16 tiles ``a``, ``b`` (bf16)
    and ``c`` (fp32); ``names`` name a and b in the errors."""
    na, nb = names
    if a.shape != (16, 16) or b.shape != (16, 16) or c.shape != (16, 16):
        raise ValueError(f"{na}, {nb}, c: expected 16 x 16 tiles")
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or not a.is_cuda:
        raise ValueError(f"{na}, {nb}: expected bfloat16 CUDA tensors")
    a, b, c = a.contiguous(), b.contiguous(), c.to(torch.float32).contiguous()
    out = torch.empty(16, 16, device=a.device, dtype=torch.float32)
    with torch.cuda.device(a.device):
        getattr(native(), launcher)(a.data_ptr(), b.data_ptr(), c.data_ptr(), out.data_ptr(), stream_of(a))
    return out


def mma_tile_check(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``c + a @ b.T`` for one 16 x 16 bf16 tile pair through the fused kernel's cp.async ->
    ldmatrix -> mma.sync path (one warp): on a GPU, the check of the fragment layouts against
    the hardware (csrc/include/bct_fast/margin_fused.h)."""
    return _tile_check("margin_fused_mma_tile_check", ("a", "b"), a, b, c)


def pv_tile_check(p: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """``c + p @ w`` for one 16 x 16 bf16 tile pair (w row-major [k][n]) through the pws kernel's
    PV path: p as fp32 accumulator fragments packed into the A fragment, w through cp.async ->
    ldmatrix.trans -> mma.sync (one warp). On a GPU, the check of the PV-orientation layouts
    against the hardware (csrc/include/bct_fast/margin_fused.h)."""
    return _tile_check("margin_fused_pv_tile_check", ("p", "w"), p, w, c)
