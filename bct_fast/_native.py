"""Calls into ``bct_fast._C`` with raw pointers: the CUDA kernels (with the current stream) and
the CPU running top-k.

The Python side owns all memory: outputs and workspaces are torch tensors allocated here on the
caller's device and stream, so the caching allocator, streams and CUDA graphs behave as usual.
"""
from __future__ import annotations

import math

import torch

from bct_fast._backend import cuda_kernels_compiled, native
from bct_fast._chunked import inv_row_norms

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """True when the compiled CUDA kernels can serve these tensors."""
    return (
        all(t.is_cuda and t.dtype in DTYPE_CODES for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and cuda_kernels_compiled()
    )


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _class_splits(B: int, C: int, device: torch.device) -> int:
    """Split the classes so that about 4 blocks per SM run even for small batches."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = math.ceil(B / 32)
    return int(max(1, min(math.ceil(4 * sms / row_blocks), math.ceil(C / 256), 1024)))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def softmax_stats(x, w, inv_nx, inv_nw, labels, target_logit, scale: float, with_pws: bool):
    """CUDA version of bct_fast._chunked.softmax_stats (same contract)."""
    x, w = x.contiguous(), w.contiguous()
    inv_nx, inv_nw, target_logit = _f32(inv_nx), _f32(inv_nw), _f32(target_logit)
    labels = labels.to(torch.int64).contiguous()
    B, d = x.shape
    C = w.shape[0]
    S = _class_splits(B, C, x.device)
    m = torch.empty(S, B, device=x.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(S, B, d, device=x.device, dtype=torch.float32) if with_pws else None
    with torch.cuda.device(x.device):
        native().margin_softmax_stats(
            x.data_ptr(), w.data_ptr(), inv_nx.data_ptr(), inv_nw.data_ptr(), labels.data_ptr(),
            target_logit.data_ptr(), B, C, d, DTYPE_CODES[x.dtype], float(scale), S,
            m.data_ptr(), l.data_ptr(), acc.data_ptr() if acc is not None else 0, _stream(x))
    # log-sum-exp merge of the class splits (empty splits carry m = -inf, l = 0).
    m_all = m.amax(0)
    weights = torch.exp(m - m_all)
    l_all = (l * weights).sum(0)
    lse = m_all + torch.log(l_all)
    if acc is None:
        return lse, x.new_empty((0,), dtype=torch.float32)
    pws = torch.einsum("sb,sbd->bd", weights, acc) / l_all[:, None]
    return lse, pws


def softmax_grads(x, w, inv_nx, inv_nw, labels, target_logit, lse, row_coef, scale: float,
                  need_x: bool, need_w: bool):
    """CUDA version of bct_fast._chunked.softmax_grads (same contract)."""
    B, d = x.shape
    C = w.shape[0]
    empty = x.new_empty((0,), dtype=torch.float32)
    gx, gw = empty, empty
    if need_x:
        # The online sweep recomputes the softmax it needs; its result equals P @ W_hat for the
        # given lse up to rounding.
        _, pws = softmax_stats(x, w, inv_nx, inv_nw, labels, target_logit, scale, True)
        gx = pws * row_coef.to(torch.float32)[:, None]
    if need_w:
        x, w = x.contiguous(), w.contiguous()
        inv_nx, inv_nw, target_logit = _f32(inv_nx), _f32(inv_nw), _f32(target_logit)
        lse, row_coef = _f32(lse), _f32(row_coef)
        labels = labels.to(torch.int64).contiguous()
        gw = torch.empty(C, d, device=x.device, dtype=torch.float32)
        with torch.cuda.device(x.device):
            native().margin_softmax_grad_weight(
                x.data_ptr(), w.data_ptr(), inv_nx.data_ptr(), inv_nw.data_ptr(),
                labels.data_ptr(), target_logit.data_ptr(), lse.data_ptr(), row_coef.data_ptr(),
                B, C, d, DTYPE_CODES[x.dtype], float(scale), gw.data_ptr(), _stream(x))
    return gx, gw


def topk_kernel_applies(q_dtype: torch.dtype, g_dtype: torch.dtype, k: int) -> bool:
    """True when the fused top-k kernel serves these dtypes and k (CUDA tensors assumed)."""
    mod = native()
    return (
        cuda_kernels_compiled()
        and mod is not None and k <= getattr(mod, "topk_max_k", 0)
        and q_dtype in DTYPE_CODES and g_dtype in DTYPE_CODES
        and (q_dtype == g_dtype or q_dtype == torch.float32)
    )


def _gallery_splits(Q: int, N: int, k: int, qt: int, device: torch.device) -> int:
    """Cut the gallery so about 4 blocks per SM run, keeping the [splits, Q, k] lists small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    q_blocks = math.ceil(Q / qt)
    by_occupancy = math.ceil(4 * sms / q_blocks)
    by_rows = max(1, N // max(4 * k, 256))  # each split should see several times k rows
    by_memory = max(1, (256 << 20) // max(1, Q * k * 12))  # <= 256 MiB of partial lists
    return int(max(1, min(by_occupancy, by_rows, by_memory, 1024)))


def cosine_topk_block(q: torch.Tensor, g: torch.Tensor, k: int, normalize: bool,
                      self_row0: int, gallery_row0: int):
    """Exact top-k of ``q`` against one gallery chunk ``g`` (rows ``gallery_row0 + j``) with the
    fused kernel. ``self_row0 >= 0``: query r is global gallery row ``self_row0 + r`` and never
    its own neighbour. Returns ``(scores [Q, k] fp32, global indices [Q, k] int64)``; raises
    ``bct_fast.search._NonFinite`` when the kernel saw a NaN/inf score."""
    from bct_fast.search import _NonFinite, _topk_lowest_index_ties

    q, g = q.contiguous(), g.contiguous()
    Q, d = q.shape
    N = g.shape[0]
    kcap = max(64, 1 << (k - 1).bit_length())
    qt = {64: 32, 128: 32, 256: 32, 512: 16, 1024: 8, 2048: 4}.get(kcap, 2)
    S = _gallery_splits(Q, N, k, qt, q.device)
    inv_nq = inv_row_norms(q, torch.float32) if normalize else None
    inv_ng = inv_row_norms(g, torch.float32) if normalize else None
    out_s = torch.empty(S, Q, k, device=q.device, dtype=torch.float32)
    out_i = torch.empty(S, Q, k, device=q.device, dtype=torch.int64)
    flag = torch.zeros(1, device=q.device, dtype=torch.int32)
    exclude = self_row0 >= 0
    exclude_offset = self_row0 - gallery_row0 if exclude else 0  # may be negative
    with torch.cuda.device(q.device):
        native().cosine_topk_partial(
            q.data_ptr(), g.data_ptr(), inv_nq.data_ptr() if inv_nq is not None else 0,
            inv_ng.data_ptr() if inv_ng is not None else 0, Q, N, d, DTYPE_CODES[q.dtype],
            DTYPE_CODES[g.dtype], k, S, exclude, exclude_offset, out_s.data_ptr(), out_i.data_ptr(),
            flag.data_ptr(), _stream(q))
    if bool(flag.item()):
        raise _NonFinite()
    # Splits hold increasing row ranges, so column order among equal scores is index order.
    s_all = out_s.permute(1, 0, 2).reshape(Q, S * k)
    i_all = out_i.permute(1, 0, 2).reshape(Q, S * k)
    top, cols = _topk_lowest_index_ties(s_all, k)
    return top, i_all.gather(1, cols) + gallery_row0


# ---- CPU running top-k (csrc/cpu/topk_select_cpu.cpp) -----------------------------------------
# Module switch: tests turn it off to run the pure-PyTorch selection on the same inputs.
USE_CPU_SELECT = True


def cpu_select_available() -> bool:
    """The extension's C++ running top-k can serve fp32 CPU score blocks."""
    mod = native()
    return USE_CPU_SELECT and mod is not None and hasattr(mod, "TopkSelector")


class CpuRunningTopk:
    """Exact running top-k of Q queries over fp32 CPU score blocks, in C++: one pass over each
    block, candidates above a per-query threshold kept in a buffer that is compacted with
    nth_element (amortized O(1) per candidate). Same contract as ``search._RunningTopk``."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self._sel = native().TopkSelector(queries, k)

    def add(self, s: torch.Tensor, n0: int) -> None:
        """Scores [Q, n] (any strides, float32, CPU, no NaN) of gallery rows n0 .. n0 + n - 1."""
        if s.dtype != torch.float32 or s.device.type != "cpu":
            raise TypeError("CpuRunningTopk.add: expected a float32 CPU tensor")
        self._sel.add_block(s.data_ptr(), s.shape[1], s.stride(0), s.stride(1), n0, torch.get_num_threads())

    def flush(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k sorted by score descending, ties by ascending gallery index."""
        scores = torch.empty(self._sel.queries, self.k, dtype=torch.float32)
        index = torch.empty(self._sel.queries, self.k, dtype=torch.int64)
        self._sel.finish(scores.data_ptr(), index.data_ptr(), torch.get_num_threads())
        return scores, index
