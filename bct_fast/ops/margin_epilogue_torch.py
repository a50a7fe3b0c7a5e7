"""PyTorch twin of the epilogue kernels (csrc/cuda/margin_epilogue_kernels.cuh).

Same signatures as the CUDA epilogue functions of :mod:`bct_fast.ops.margin_softmax_epilogue`
and the same arithmetic order where PyTorch allows it: the logits are
``((S * scale) * inv_nx) * inv_nw`` in fp32, bit for bit the kernels' z; sums and ``exp`` may
differ from the kernels' in the last bits (other summation order, CUDA's ``expf``). It lets the
whole chunk loop run, and be tested, on the CPU; the emulator tests compare the kernels to it.
All inputs are contiguous: ``scores`` fp32 [B, cols], per-row vectors fp32 [B] (``labels``
int64), ``inv_nw`` fp32 [cols] (the chunk's classes), outputs preallocated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bct_fast.ops.rows import mask_one_column


def leave_targets_out(z: Tensor, labels: Tensor, c0: int) -> Tensor:
    """``z`` [B, cols] with each row's target column, where it lies in this chunk (``labels - c0``
    in [0, cols)), set to -inf; in place and in fixed shapes (no host sync on a GPU)."""
    return mask_one_column(z, labels - c0)


def chunk_logits(scores: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor, c0: int,
                 scale: float) -> Tensor:
    """z = scale * S * inv_nx * inv_nw (that order) with each row's target column in this chunk
    (``labels - c0`` in [0, cols)) left out as -inf, as the kernels do (the caller combines the
    statistics with the target logit in float64). A new fp32 tensor."""
    return leave_targets_out(scores.mul(scale).mul_(inv_nx[:, None]).mul_(inv_nw[None, :]), labels, c0)


def stats_epilogue(scores: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
                   c0: int, scale: float, m: Tensor, l: Tensor,
                   e_out: Tensor | None = None, alpha_out: Tensor | None = None) -> None:
    """Merge one score block, without each row's target column, into the running (m, l) in
    place; with ``e_out`` also write e = exp(z - m_new) * inv_nw (in e_out's dtype; 0 in the
    target column) and ``alpha_out`` = exp(m_old - m_new)."""
    z = chunk_logits(scores, inv_nx, inv_nw, labels, c0, scale)
    m_new = torch.maximum(m, z.amax(1))
    none_yet = m_new == float("-inf")  # every logit so far -inf: contribute 0, not NaN
    e = z.sub_(torch.where(none_yet, 0.0, m_new)[:, None]).exp_()
    e.masked_fill_(none_yet[:, None], 0.0)
    alpha = torch.where(m == float("-inf"), 0.0, torch.exp(m - m_new))
    l.mul_(alpha).add_(e.sum(1))
    m.copy_(m_new)
    if e_out is not None:
        e_out.copy_(e.mul_(inv_nw[None, :]))
        alpha_out.copy_(alpha)


def grads_epilogue(scores: Tensor, inv_nx: Tensor, inv_nw: Tensor, labels: Tensor,
                   c0: int, scale: float, lse: Tensor, row_coef: Tensor,
                   p_out: Tensor | None = None, pw_out: Tensor | None = None) -> None:
    """p = row_coef * exp(z - lse) and pw = exp(z - lse) * inv_nw (each in its output's dtype);
    0 in each row's target column, and rows with row_coef == 0 get zeros in both."""
    z = chunk_logits(scores, inv_nx, inv_nw, labels, c0, scale)
    dead = (row_coef == 0)[:, None]
    e = z.sub_(lse[:, None]).exp_()
    if p_out is not None:
        p_out.copy_((row_coef[:, None] * e).masked_fill_(dead, 0.0))
    if pw_out is not None:
        pw_out.copy_(e.mul_(inv_nw[None, :]).masked_fill_(dead, 0.0))
