"""The CUDA provider of exact top-k search: the fused kernel over one gallery chunk.

The kernel writes per gallery split a [Q, k] list, best first, and marks places it cannot fill
(a split with fewer than k usable rows) with score -inf and index -1; the splits are merged here
with the tie rule of :mod:`bct_fast.ops.topk_select`.
"""
from __future__ import annotations

import math

import torch

from bct_fast._core.extension import native
from bct_fast.ops.native_call import DTYPE_CODES, stream_of
from bct_fast.ops.providers import Unsupported
from bct_fast.ops.rows import inv_row_norms
from bct_fast.ops.topk_select import NonFiniteScores, topk_lowest_index_ties


def max_k() -> int:
    """The largest k the fused kernel serves (0 without CUDA kernels)."""
    mod = native()
    return int(getattr(mod, "topk_max_k", 0)) if mod is not None else 0


def unsupported(q_dtype: torch.dtype, g_dtype: torch.dtype, k: int) -> Unsupported | None:
    """Why the kernel cannot serve these dtypes and k, or None."""
    if torch.float64 in (q_dtype, g_dtype):
        return Unsupported("float64 inputs (the kernel computes in fp32)", expected=True)
    if q_dtype not in DTYPE_CODES or g_dtype not in DTYPE_CODES or not (q_dtype == g_dtype or q_dtype == torch.float32):
        return Unsupported(f"queries {q_dtype} with gallery {g_dtype} (the kernel takes equal "
                           "fp32/fp16/bf16 dtypes, or fp32 queries)")
    if k > max_k():
        return Unsupported(f"k={k} is above the kernel's limit of {max_k()}")
    return None


def _gallery_splits(Q: int, N: int, k: int, qt: int, device: torch.device) -> int:
    """Cut the gallery so about 4 blocks per SM run, keeping the [splits, Q, k] lists small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    q_blocks = math.ceil(Q / qt)
    by_occupancy = math.ceil(4 * sms / q_blocks)
    by_rows = max(1, N // max(4 * k, 256))  # each split should see several times k rows
    by_memory = max(1, (256 << 20) // max(1, Q * k * 12))  # <= 256 MiB of partial lists
    return int(max(1, min(by_occupancy, by_rows, by_memory, 1024)))


def launch_partial(q: torch.Tensor, g: torch.Tensor, k: int, normalize: bool, exclude_offset: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Run the kernel: per-split lists ``(scores [S, Q, k], chunk-local indices [S, Q, k], nonfinite)``.
    ``exclude_offset``: query r is chunk row ``exclude_offset + r`` (None: no self-exclusion)."""
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
    with torch.cuda.device(q.device):
        native().cosine_topk_partial(
            q.data_ptr(), g.data_ptr(), inv_nq.data_ptr() if inv_nq is not None else 0,
            inv_ng.data_ptr() if inv_ng is not None else 0, Q, N, d, DTYPE_CODES[q.dtype],
            DTYPE_CODES[g.dtype], k, S, exclude_offset is not None, exclude_offset or 0,
            out_s.data_ptr(), out_i.data_ptr(), flag.data_ptr(), stream_of(q))
    return out_s, out_i, bool(flag.item())


def merge_splits(out_s: torch.Tensor, out_i: torch.Tensor, k: int, gallery_row0: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split lists into one [Q, k] top-k with global indices. Unfilled places (index
    -1, score -inf) keep index -1: the offset is added to real rows only."""
    S, Q, _ = out_s.shape
    # Splits hold increasing row ranges, so column order among equal scores is index order.
    s_all = out_s.permute(1, 0, 2).reshape(Q, S * k)
    i_all = out_i.permute(1, 0, 2).reshape(Q, S * k)
    top, cols = topk_lowest_index_ties(s_all, k)
    idx = i_all.gather(1, cols)
    return top, torch.where(idx >= 0, idx + gallery_row0, idx)


def cosine_topk_block(q: torch.Tensor, g: torch.Tensor, k: int, normalize: bool,
                      self_row0: int, gallery_row0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q`` against one gallery chunk ``g`` (rows ``gallery_row0 + j``).
    ``self_row0 >= 0``: query r is global gallery row ``self_row0 + r`` and never its own
    neighbour. Returns ``(scores [Q, k] fp32, global indices [Q, k] int64)``, -1 where the chunk
    had fewer than k usable rows; raises :class:`NonFiniteScores` on a NaN/inf score."""
    q, g = q.contiguous(), g.contiguous()
    exclude_offset = self_row0 - gallery_row0 if self_row0 >= 0 else None  # may be negative
    out_s, out_i, nonfinite = launch_partial(q, g, k, normalize, exclude_offset)
    if nonfinite:
        raise NonFiniteScores()
    return merge_splits(out_s, out_i, k, gallery_row0)
