"""The CUDA provider of the margin-softmax sweeps: ``bct_fast._C`` launchers with raw pointers.

Same contract as :mod:`bct_fast.ops.margin_softmax_torch`; the class-split partial results are
merged here with a log-sum-exp. The two launches are injectable (``launch_stats``,
``launch_grad_weight``, with ``sms`` for the class-split rule) so that this glue runs on a CPU
against the kernel emulator (tests/ops/test_margin_softmax_cuda_glue_emulated.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from bct_fast._core.extension import native
from bct_fast.ops.native_call import DTYPE_CODES, f32, stream_of
from bct_fast.ops.providers import Unsupported


# (x, w, inv_nx, inv_nw, labels, scale, splits, m [S, B], l [S, B],
#  acc [S, B, d] | None) -> None, filling m, l (and acc).
StatsLaunch = Callable[..., None]
# (x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, gw [C, d]) -> None, filling gw.
GradWeightLaunch = Callable[..., None]


def native_stats_launch(x, w, inv_nx, inv_nw, labels, scale: float, splits: int,
                        m, l, acc) -> None:
    """One call of the CUDA launcher ``margin_softmax_stats`` (contiguous inputs, fp32 vectors,
    int64 labels; fp32 outputs, ``acc`` None without the accumulator)."""
    B, d = x.shape
    C = w.shape[0]
    with torch.cuda.device(x.device):
        native().margin_softmax_stats(
            x.data_ptr(), w.data_ptr(), inv_nx.data_ptr(), inv_nw.data_ptr(), labels.data_ptr(),
            B, C, d, DTYPE_CODES[x.dtype], float(scale), splits,
            m.data_ptr(), l.data_ptr(), acc.data_ptr() if acc is not None else 0, stream_of(x))


def native_grad_weight_launch(x, w, inv_nx, inv_nw, labels, lse, row_coef,
                              scale: float, gw) -> None:
    """One call of the CUDA launcher ``margin_softmax_grad_weight`` (same conventions)."""
    B, d = x.shape
    C = w.shape[0]
    with torch.cuda.device(x.device):
        native().margin_softmax_grad_weight(
            x.data_ptr(), w.data_ptr(), inv_nx.data_ptr(), inv_nw.data_ptr(),
            labels.data_ptr(), lse.data_ptr(), row_coef.data_ptr(),
            B, C, d, DTYPE_CODES[x.dtype], float(scale), gw.data_ptr(), stream_of(x))


def unsupported(x: torch.Tensor, w: torch.Tensor) -> Unsupported | None:
    """Why the kernels cannot serve these (CUDA) tensors, or None."""
    if x.dtype == torch.float64 or w.dtype == torch.float64:
        return Unsupported("float64 inputs (the kernels compute in fp32)", expected=True)
    if x.dtype not in DTYPE_CODES or w.dtype != x.dtype:
        return Unsupported(f"dtypes {x.dtype} / {w.dtype} (the kernels take one of fp32/fp16/bf16 for both)")
    return None


def _class_splits(B: int, C: int, device: torch.device, sms: int | None = None) -> int:
    """Split the classes so that about 4 blocks per SM run even for small batches (``sms``:
    the SM count, default the device's)."""
    if sms is None:
        if device.type != "cuda":
            raise ValueError(f"sms: needed for tensors on {device} (an injected launch)")
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = math.ceil(B / 32)
    return int(max(1, min(math.ceil(4 * sms / row_blocks), math.ceil(C / 256), 1024)))


def merge_class_splits(m: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of per-split (max, sum-exp) [S, B] -> (lse [B] float64, weights [S, B],
    l_all [B]).

    An empty split (or one whose logits are all -inf) carries m = -inf, l = 0: its weight is 0,
    never exp(-inf - -inf) = NaN; a row with no finite logit at all gets lse = -inf."""
    m_all = m.amax(0)
    finite = torch.isfinite(m)
    weights = torch.where(finite, torch.exp(m - torch.where(torch.isfinite(m_all), m_all, 0.0)),
                          torch.zeros((), dtype=m.dtype, device=m.device))
    l_all = (l * weights).sum(0)
    return m_all.double() + torch.log(l_all.double()), weights, l_all


def softmax_stats(x, w, inv_nx, inv_nw, labels, scale: float, with_pws: bool, *,
                  launch_stats: StatsLaunch | None = None, sms: int | None = None):
    """Over each row's non-target columns: the log-sum-exp (float64) and, with ``with_pws``, the
    softmax-weighted sum of the class rows. ``launch_stats`` (default :func:`native_stats_launch`)
    and ``sms`` (default the device's SM count): see the module docstring."""
    x, w = x.contiguous(), w.contiguous()
    inv_nx, inv_nw = f32(inv_nx), f32(inv_nw)
    labels = labels.to(torch.int64).contiguous()
    B, d = x.shape
    C = w.shape[0]
    S = _class_splits(B, C, x.device, sms)
    m = torch.empty(S, B, device=x.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(S, B, d, device=x.device, dtype=torch.float32) if with_pws else None
    (launch_stats or native_stats_launch)(x, w, inv_nx, inv_nw, labels, scale, S, m, l, acc)
    lse, weights, l_all = merge_class_splits(m, l)
    if acc is None:
        return lse, x.new_empty((0,), dtype=torch.float32)
    # A row with no non-target column (C = 1) has l_all = 0 and acc = 0: pws 0, not 0 / 0.
    pws = torch.einsum("sb,sbd->bd", weights, acc) / torch.where(l_all > 0, l_all, 1.0)[:, None]
    return lse, pws


def softmax_grads(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale: float,
                  need_x: bool, need_w: bool, *, launch_stats: StatsLaunch | None = None,
                  launch_grad_weight: GradWeightLaunch | None = None, sms: int | None = None):
    """P @ W_hat and P.T @ X_hat with P_ij = row_coef_i * softmax_ij, 0 in each row's target column
    (fp32; empty when not needed). The launches and ``sms``: see :func:`softmax_stats`."""
    B, d = x.shape
    C = w.shape[0]
    empty = x.new_empty((0,), dtype=torch.float32)
    gx, gw = empty, empty
    if need_x:
        # The online sweep recomputes the softmax over the non-target columns, normalized by their
        # own sum; exp(lse_rest - lse) rescales it to the softmax of the given lse (0 for a row
        # with no non-target column).
        lse_rest, pws = softmax_stats(x, w, inv_nx, inv_nw, labels, scale, True,
                                      launch_stats=launch_stats, sms=sms)
        ratio = torch.exp(lse_rest - lse.to(torch.float64))
        ratio = torch.where(torch.isneginf(lse_rest), 0.0, ratio)
        gx = pws * (ratio * row_coef.to(torch.float64)).to(torch.float32)[:, None]
    if need_w:
        x, w = x.contiguous(), w.contiguous()
        inv_nx, inv_nw = f32(inv_nx), f32(inv_nw)
        lse, row_coef = f32(lse), f32(row_coef)
        labels = labels.to(torch.int64).contiguous()
        gw = torch.empty(C, d, device=x.device, dtype=torch.float32)
        (launch_grad_weight or native_grad_weight_launch)(x, w, inv_nx, inv_nw, labels, lse,
                                                          row_coef, scale, gw)
    return gx, gw
