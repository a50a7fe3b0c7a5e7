"""The "epilogue" provider of the margin-softmax sweeps: library GEMMs + our epilogue kernels.

Same contract as :mod:`bct_fast.ops.margin_softmax_torch`. Per class chunk, the raw score block
``S = x @ w_c.T`` comes from ``torch.mm`` (cuBLAS tensor cores for bf16 operands, fp32 output
and accumulation), and everything after the GEMM is one kernel (csrc/cuda/margin_epilogue*):

- forward: scale, inverse norms, the target column left out and the online (max, sum-exp) merge
  into the running fp32 ``m, l``; with ``with_pws`` the kernel also writes the block
  ``e = exp(z - m) * inv_nw`` and the rescale factor, and ``acc = acc * alpha + e @ w_c``
  is a second GEMM (2 GEMMs per chunk);
- backward: ``p = row_coef * exp(z - lse)`` for ``gw_c = p.T @ x_hat`` and
  ``pw = exp(z - lse) * inv_nw`` for ``gx += pw @ w_c`` (3 GEMMs per chunk, one recompute).

The target column of each row is left out of everything (the kernels treat its logit as -inf
and write 0 there), as the op contract asks of every provider: the caller combines the
statistics with the target logit and adds that column's coefficient p_y - 1 in float64. A bf16
``p_y`` (error up to 2^-9) in a block would leave the gradient of a row whose loss is below
~1e-2 mostly rounding error.

Why the inverse norms are applied in the epilogue and not to the operands: the GEMMs read the
caller's x and w as they are (for bf16 parameters: no normalized, re-rounded copy of each class
chunk, whose read + write would cost about as much HBM traffic as the GEMM's own read of w), and
bf16 operands stay exact. ``inv_nw`` is folded into ``e`` / ``pw`` (at most ~1e38: fits fp32 and
bf16, whose exponent range is fp32's) and ``row_coef`` is applied to gx once at the end (a
per-row factor), so no block entry can overflow for zero or tiny rows.

Operands: fp32 inputs give fp32 GEMMs (TF32 only if the user enabled it in torch), bf16 inputs
bf16 GEMMs with fp32 output; fp16 is not served (``inv_nw`` folded into a block would overflow
fp16's range). Blocks ``e, p, pw`` have the operand dtype. Chunks: about 16M scores
(:func:`epilogue_chunk`: a 64 MiB fp32 block). They were sized at 4M for L2 residency between
the GEMM and the epilogue; the H200 measured the opposite (B = 1024, C = 1M, d = 512, bf16,
trainable forward + backward: 56.6 ms at 4096 classes per chunk, 29.2 ms at 16384, 27.5 ms at
65536; benchmarks/results/gpu_2026-11-26b_h200.md): the loop is host-bound at small blocks.

The epilogue functions are injectable (:class:`Epilogue`): :data:`CUDA_EPILOGUE` (the kernels,
CUDA tensors) or :data:`TORCH_EPILOGUE` (the PyTorch twin, any device). ``backend="epilogue"``
on CPU tensors runs this loop with the twin (a test and debugging route, not faster than
``backend="torch"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bct_fast._core.extension import native
from bct_fast.ops import margin_epilogue_torch
from bct_fast.ops.cpu_gemm import mm_f32
from bct_fast.ops.native_call import DTYPE_CODES, f32, stream_of
from bct_fast.ops.providers import Unsupported
from bct_fast.ops.rows import normalized_rows

OPERAND_DTYPES = (torch.float32, torch.bfloat16)
_BLOCK_ELEMS = 1 << 24  # fp32 score block of 64 MiB (measured 1.9x faster than 16 MiB, see above)
_COL_ALIGN = 256  # chunk widths a multiple of the GEMM tile widths


@dataclass(frozen=True)
class Epilogue:
    """The two epilogue functions (signatures of :mod:`bct_fast.ops.margin_epilogue_torch`)."""

    stats: Callable[..., None]
    grads: Callable[..., None]
    name: str


def unsupported(x: Tensor, w: Tensor) -> Unsupported | None:
    """Why this provider cannot serve tensors of these dtypes, or None."""
    if x.dtype == torch.float64 or w.dtype == torch.float64:
        return Unsupported("float64 inputs (the epilogue computes in fp32)", expected=True)
    if x.dtype != w.dtype or x.dtype not in OPERAND_DTYPES:
        return Unsupported(f"dtypes {x.dtype} / {w.dtype} (the epilogue provider takes float32 or "
                           f"bfloat16 for both; fp16 blocks would overflow)")
    return None


def epilogue_chunk(rows: int, classes: int) -> int:
    """Classes per chunk: about 16M scores per block, a multiple of 256 (at least 256)."""
    cols = max(_COL_ALIGN, _BLOCK_ELEMS // max(rows, 1) // _COL_ALIGN * _COL_ALIGN)
    return max(1, min(classes, cols))


# ---- the CUDA epilogue functions (raw pointers into bct_fast._C) ---------------------------

def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_stats(scores, inv_nx, inv_nw, labels, c0, scale, m, l, e_out=None,
                alpha_out=None) -> None:
    B, cols = scores.shape
    with torch.cuda.device(scores.device):
        native().margin_epilogue_stats(
            scores.data_ptr(), B, cols, inv_nx.data_ptr(), inv_nw.data_ptr(), labels.data_ptr(),
            int(c0), float(scale), m.data_ptr(), l.data_ptr(),
            _ptr(e_out), DTYPE_CODES[e_out.dtype] if e_out is not None else 0, _ptr(alpha_out),
            stream_of(scores))


def _cuda_grads(scores, inv_nx, inv_nw, labels, c0, scale, lse, row_coef,
                p_out=None, pw_out=None) -> None:
    B, cols = scores.shape
    out = p_out if p_out is not None else pw_out
    with torch.cuda.device(scores.device):
        native().margin_epilogue_grads(
            scores.data_ptr(), B, cols, inv_nx.data_ptr(), inv_nw.data_ptr(), labels.data_ptr(),
            int(c0), float(scale), lse.data_ptr(), row_coef.data_ptr(),
            _ptr(p_out), _ptr(pw_out), DTYPE_CODES[out.dtype], stream_of(scores))


CUDA_EPILOGUE = Epilogue(_cuda_stats, _cuda_grads, "cuda")
TORCH_EPILOGUE = Epilogue(margin_epilogue_torch.stats_epilogue,
                          margin_epilogue_torch.grads_epilogue, "torch")


def default_epilogue(device: torch.device) -> Epilogue:
    """The kernels for CUDA tensors, the PyTorch twin elsewhere."""
    return CUDA_EPILOGUE if device.type == "cuda" else TORCH_EPILOGUE


def _prepare(x, w, inv_nx, inv_nw, labels):
    why = unsupported(x, w)
    if why is not None:
        raise ValueError(f"x, w: the epilogue provider cannot serve them: {why.reason}")
    return (x.contiguous(), w.contiguous(), f32(inv_nx), f32(inv_nw),
            labels.to(torch.int64).contiguous())


# ---- the provider (the chunk loop) -------------------------------------------------------------

def softmax_stats(x: Tensor, w: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
                  scale: float, with_pws: bool, chunk: int = 0,
                  epilogue: Epilogue | None = None) -> tuple[Tensor, Tensor]:
    """Over each row's non-target columns: the log-sum-exp of the logits (float64) and, with
    ``with_pws``, sum_j softmax_ij * w_hat_j (fp32; 1 GEMM per chunk, 2 with ``with_pws``)."""
    x, w, inv_nx, inv_nw, labels = _prepare(x, w, inv_nx, inv_nw, labels)
    ep = epilogue or default_epilogue(x.device)
    B, d = x.shape
    C = w.shape[0]
    chunk = chunk or epilogue_chunk(B, C)
    f = dict(device=x.device, dtype=torch.float32)
    m = torch.full((B,), float("-inf"), **f)
    l = torch.zeros(B, **f)
    acc = torch.zeros(B, d, **f) if with_pws else None
    alpha = torch.empty(B, **f) if with_pws else None
    for c0 in range(0, C, chunk):
        wc = w[c0:c0 + chunk]  # a row slice of a contiguous w: contiguous
        scores = mm_f32(x, wc.T)
        e = torch.empty(scores.shape, device=x.device, dtype=x.dtype) if with_pws else None
        ep.stats(scores, inv_nx, inv_nw[c0:c0 + chunk], labels, c0, scale, m, l, e,
                 alpha)
        if acc is not None:
            acc.mul_(alpha[:, None]).add_(mm_f32(e, wc))
    lse = m.double() + torch.log(l.double())
    pws = acc / l[:, None] if acc is not None else x.new_empty((0,), dtype=torch.float32)
    return lse, pws


def softmax_grads(x: Tensor, w: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
                  lse: Tensor, row_coef: Tensor, scale: float,
                  need_x: bool, need_w: bool, chunk: int = 0,
                  epilogue: Epilogue | None = None) -> tuple[Tensor, Tensor]:
    """With P_ij = row_coef_i * softmax_ij (from the given ``lse``), 0 in each row's target column:
    gx = P @ W_hat [B, d] and gw = P.T @ X_hat [C, d] (fp32; empty when not needed). Per chunk:
    one score recompute, one epilogue, one GEMM per needed output."""
    x, w, inv_nx, inv_nw, labels = _prepare(x, w, inv_nx, inv_nw, labels)
    lse, row_coef = f32(lse), f32(row_coef)
    ep = epilogue or default_epilogue(x.device)
    B, d = x.shape
    C = w.shape[0]
    chunk = chunk or epilogue_chunk(B, C)
    f = dict(device=x.device, dtype=torch.float32)
    gx = torch.zeros(B, d, **f) if need_x else torch.empty(0, **f)
    gw = torch.empty(C, d, **f) if need_w else torch.empty(0, **f)
    if not (need_x or need_w):
        return gx, gw
    xh = normalized_rows(x, inv_nx).to(x.dtype) if need_w else None  # B x d: small
    for c0 in range(0, C, chunk):
        wc = w[c0:c0 + chunk]
        scores = mm_f32(x, wc.T)
        p = torch.empty(scores.shape, device=x.device, dtype=x.dtype) if need_w else None
        pw = torch.empty(scores.shape, device=x.device, dtype=x.dtype) if need_x else None
        ep.grads(scores, inv_nx, inv_nw[c0:c0 + chunk], labels, c0, scale, lse,
                 row_coef, p, pw)
        if need_x:
            gx.add_(mm_f32(pw, wc))
        if need_w:
            gw[c0:c0 + chunk] = mm_f32(p.T, xh)
    if need_x:
        gx.mul_(row_coef[:, None])  # the per-row factor, once (see the module docstring)
    return gx, gw
