"""PyTorch twin of the top-k epilogue kernel (csrc/cuda/topk_epilogue_kernels.cuh).

Same signature and contract as the CUDA selection function of :mod:`bct_fast.ops.topk_epilogue`
(csrc/include/bct_fast/topk_epilogue.h): fold one fp32 score block into the running top-k lists
in place. The scores are computed in the kernel's order (``S * inv_nq`` then ``* inv_ng``, fp32)
and the selection is exact, so twin and kernel agree bit for bit. It lets the whole chunk loop
run, and be tested, on CPU tensors; the emulator tests compare the kernel to it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from bct_fast.ops.topk_select import topk_lowest_index_ties


def block_scores(scores: Tensor, inv_nq: Tensor | None, inv_ng: Tensor | None, exclude: bool,
                 self_col0: int) -> tuple[Tensor, Tensor]:
    """``(v, bad)``: the block's scores as the kernel reads them (excluded and non-finite entries
    at -inf, -0 as +0) and a [rows] mask of rows with a NaN/inf score outside the excluded column."""
    v = scores.clone()
    if inv_nq is not None:
        v.mul_(inv_nq[:, None])
    if inv_ng is not None:
        v.mul_(inv_ng[None, :])
    rows, cols = v.shape
    own = torch.zeros_like(v, dtype=torch.bool)
    if exclude:
        r = torch.arange(rows, device=v.device)
        c = self_col0 + r
        hit = (c >= 0) & (c < cols)
        own[r[hit], c[hit]] = True
    nonfinite = ~torch.isfinite(v) & ~own
    v.masked_fill_(nonfinite | own, -math.inf)
    v.add_(0.0)  # -0 + +0 = +0: zero scores tie as in IEEE comparisons
    return v, nonfinite.any(1)


def select_block(scores: Tensor, inv_nq: Tensor | None, inv_ng: Tensor | None, k: int, n0: int,
                 exclude: bool, self_col0: int, run_s: Tensor, run_i: Tensor,
                 nonfinite: Tensor) -> None:
    """Fold the block (gallery rows ``n0 + j``) into the lists ``run_s``/``run_i`` [rows, k] in
    place (sorted by score descending, ties to the lower index, padding (-inf, -1) last);
    ``nonfinite`` (int32 [1]) is set to 1 when a non-finite score was met."""
    v, bad = block_scores(scores, inv_nq, inv_ng, exclude, self_col0)
    if bool(bad.any()):
        nonfinite.fill_(1)
    cols = v.shape[1]
    # List entries come first: their indices are below n0, so column order is index order.
    s_all = torch.cat([run_s.masked_fill(run_i < 0, -math.inf), v], 1)
    i_all = torch.cat([run_i, torch.arange(n0, n0 + cols, device=v.device).expand(v.shape[0], -1)], 1)
    top, col = topk_lowest_index_ties(s_all, k)
    idx = i_all.gather(1, col)
    pad = top == -math.inf  # never selected: padding
    run_s.copy_(top.masked_fill(pad, -math.inf))
    run_i.copy_(idx.masked_fill(pad, -1))
