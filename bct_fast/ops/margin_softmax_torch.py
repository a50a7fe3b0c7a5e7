"""The torch provider of the margin-softmax sweeps: chunked PyTorch (any device, bounded memory).

Same contract as the CUDA launchers in csrc/include/bct_fast/margin_softmax.h, computed over
class chunks of ``chunk`` rows so that at most B x chunk logits exist at a time. fp16/bf16
inputs are upcast chunk by chunk; accumulation is in the dtype of the inverse norms
(fp32, or fp64 for float64 inputs so that gradcheck can run on this path). Every sweep leaves
each row's target column out: the statistics are over the other columns (lse in float64,
``m + log l``) and the gradient sweep gives it 0; the caller combines them with the target
logit in float64.

bf16 embeddings and classifier on CUDA (:func:`tensor_core_blocks`) take the tensor cores for
every GEMM: the sweeps run the epilogue provider's chunk loop
(:mod:`bct_fast.ops.margin_softmax_epilogue`) with the PyTorch twin of its kernels, in this
provider's larger chunks: bf16 x bf16 -> fp32 logit GEMMs on the raw rows (norms applied to the
fp32 products), and bf16 e / p / pw blocks for the P @ W and P.T @ X products, the arithmetic
whose error the epilogue provider's tests hold to at most 2x plain bf16 PyTorch's. Upcast to
fp32, those two products ran on the SIMT units (~60 TFLOP/s on an H200 against ~750 for bf16
tensor cores): at B = 1024, C = 1M they alone would take ~35 ms of a trainable step.
"""
from __future__ import annotations

import torch

from bct_fast.ops import margin_softmax_epilogue
from bct_fast.ops.cpu_gemm import mm_nt, mm_tn
from bct_fast.ops.margin_epilogue_torch import leave_targets_out
from bct_fast.ops.margin_softmax_epilogue import TORCH_EPILOGUE
from bct_fast.ops.rows import normalized_rows

# Elements of one B x chunk logit block: 4M fp32 = 16 MiB on a CPU (cache-friendly), 32M fp32 =
# 128 MiB on a GPU (a few such blocks live at a time), where each chunk costs ~10 kernel launches
# and 4M-logit chunks of a 1M-class classifier at B = 1024 meant ~250 of them per sweep.
_BLOCK_ELEMS = 1 << 22
_CUDA_BLOCK_ELEMS = 1 << 25


def auto_chunk(rows: int, classes: int, cuda: bool = False) -> int:
    """Classes per chunk: about 4M (CPU) / 32M (GPU) logits per block, at least 256 classes."""
    elems = _CUDA_BLOCK_ELEMS if cuda else _BLOCK_ELEMS
    return max(1, min(classes, max(256, elems // max(rows, 1))))


def tensor_core_blocks(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the sweeps run on bf16 tensor-core GEMMs (module docstring): bf16 embeddings and
    classifier on CUDA. The upcast fp32 route measured ~5x slower than plain PyTorch on an H200
    (benchmarks/results/gpu_2026-11-26_h200.md)."""
    return x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16


def _rows(w: torch.Tensor, inv_nw: torch.Tensor, c0: int, chunk: int) -> torch.Tensor:
    """Normalized class rows [c0, c0 + chunk) (no slicing when the chunk is all of them)."""
    if c0 == 0 and chunk >= w.shape[0]:
        return normalized_rows(w, inv_nw)
    return normalized_rows(w[c0:c0 + chunk], inv_nw[c0:c0 + chunk])


def _chunk_logits(xh: torch.Tensor, wc: torch.Tensor, c0: int, labels: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """scale * xh @ wc.T with each row's target column left out (-inf)."""
    return leave_targets_out(mm_nt(xh, wc).mul_(scale), labels, c0)


def softmax_stats(x: torch.Tensor, w: torch.Tensor, inv_nx: torch.Tensor, inv_nw: torch.Tensor,
                  labels: torch.Tensor, scale: float, with_pws: bool,
                  chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Over each row's non-target columns: the log-sum-exp of the logits (float64) and, with
    ``with_pws``, sum_j softmax_ij * w_hat_j (softmax over those columns)."""
    B, d = x.shape
    C = w.shape[0]
    chunk = chunk or auto_chunk(B, C, x.is_cuda)
    if tensor_core_blocks(x, w):
        return margin_softmax_epilogue.softmax_stats(x, w, inv_nx, inv_nw, labels, scale,
                                                     with_pws, chunk, epilogue=TORCH_EPILOGUE)
    xh = normalized_rows(x, inv_nx)
    m = l = acc = None
    for c0 in range(0, C, chunk):
        wc = _rows(w, inv_nw, c0, chunk)
        z = _chunk_logits(xh, wc, c0, labels, scale)
        # The first chunk starts the running (m, l, acc); later ones are merged into them.
        m_new = z.amax(1) if m is None else torch.maximum(m, z.amax(1))
        # Rows with no finite logit yet (C = 1: only the target column) add 0, never NaN.
        e = z.sub_(torch.where(m_new == float("-inf"), 0.0, m_new)[:, None]).exp_()
        if m is None:
            l, acc = e.sum(1), (mm_nt(e, wc.T) if with_pws else None)
        else:
            alpha = torch.where(m == float("-inf"), 0.0, torch.exp(m - m_new))
            l = l * alpha + e.sum(1)
            if acc is not None:
                acc.mul_(alpha[:, None]).add_(mm_nt(e, wc.T))
        m = m_new
    lse = m.double() + torch.log(l.double())
    pws = acc / l[:, None] if acc is not None else x.new_empty((0,), dtype=inv_nx.dtype)
    return lse, pws


def softmax_grads(x: torch.Tensor, w: torch.Tensor, inv_nx: torch.Tensor, inv_nw: torch.Tensor,
                  labels: torch.Tensor, lse: torch.Tensor,
                  row_coef: torch.Tensor, scale: float, need_x: bool, need_w: bool,
                  chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """With P_ij = row_coef_i * softmax_ij (softmax from the given ``lse``) and 0 in each row's
    target column: gx = P @ W_hat  [B, d]  and  gw = P.T @ X_hat  [C, d] (accumulation dtype;
    empty when not needed). One logit recompute serves both (3 GEMMs per chunk)."""
    B, d = x.shape
    C = w.shape[0]
    chunk = chunk or auto_chunk(B, C, x.is_cuda)
    if tensor_core_blocks(x, w):
        return margin_softmax_epilogue.softmax_grads(x, w, inv_nx, inv_nw, labels, lse,
                                                     row_coef, scale, need_x, need_w, chunk,
                                                     epilogue=TORCH_EPILOGUE)
    empty = x.new_empty((0,), dtype=inv_nx.dtype)
    if not (need_x or need_w):
        return empty, empty
    xh = normalized_rows(x, inv_nx)
    lse = lse.to(inv_nx.dtype)
    gx = gw = None
    for c0 in range(0, C, chunk):
        wc = _rows(w, inv_nw, c0, chunk)
        z = _chunk_logits(xh, wc, c0, labels, scale)
        p = z.sub_(lse[:, None]).exp_().mul_(row_coef[:, None])
        if need_x:
            gx = mm_nt(p, wc.T) if gx is None else gx.add_(mm_nt(p, wc.T))
        if need_w and chunk >= C:  # one chunk: the product is the whole gradient
            gw = mm_tn(p, xh)
        elif need_w:
            if gw is None:
                gw = torch.empty(C, d, device=x.device, dtype=inv_nx.dtype)
            gw[c0:c0 + chunk] = mm_tn(p, xh)
    return (gx if need_x else empty), (gw if need_w else empty)


def weighted_row_sum(t: torch.Tensor, coef: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """sum_j coef_j * t_j in coef's dtype without an upcast copy of all of ``t``."""
    out = torch.zeros(t.shape[1], device=t.device, dtype=coef.dtype)
    for c0 in range(0, t.shape[0], chunk):
        out.addmv_(t[c0:c0 + chunk].to(coef.dtype).T, coef[c0:c0 + chunk])
    return out
