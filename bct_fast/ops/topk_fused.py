"""The "fused" provider of exact top-k cosine search: tensor-core tiles, selection in shared memory.

One kernel family (csrc/cuda/topk_fused*, contract in csrc/include/bct_fast/topk_fused.h) computes
128 x 128 score tiles with mma.sync bf16 (fp32 accumulation), applies the inverse norms to the
accumulators and keeps each query's best candidates in shared memory, filtered by its running
k-th score; the Q x N score matrix is never written (the epilogue provider writes it block by
block and reads it back). Gallery ranges are split over blocks and a second kernel merges the
splits into the running lists.

Which scores: the epilogue provider's bf16 mode (:mod:`bct_fast.ops.topk_epilogue`): the raw bf16
products accumulated in fp32, then ``* inv_nq * inv_ng`` (fp32 inverse norms of the given rows,
omitted with ``normalize=False``). The result is the exact top-k of those fp32 scores, sorted
descending, ties to the lower gallery index. The tensor cores sum in their own order, so a score
may differ from cuBLAS's (the epilogue provider's) by an ulp or so and near-ties may rank
differently; both are within ``~d 2^-24`` of the float64 score of the bf16 values.

Serves bfloat16 queries and gallery on CUDA devices of compute capability 8.0 or newer, k <= 128
(:data:`MAX_K`); there is no CPU twin. The launch is injectable (``launch``) so the chunk and
query-block loop runs on a CPU against the kernel emulator (tests/ops/test_topk_fused.py).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import check_matrix, nonfinite_error
from bct_fast._core.extension import native
from bct_fast.ops import device_limits
from bct_fast.ops.native_call import DTYPE_CODES, stream_of
from bct_fast.ops.providers import Unsupported
from bct_fast.ops.rows import inv_row_norms, inv_row_norms_stepped

__all__ = ["cosine_topk_fused", "unsupported", "MAX_K", "Launch", "native_launch"]

MAX_K = 128                # kTopkFusedMaxK (csrc/include/bct_fast/topk_fused.h)
_MAX_CHUNK = 1 << 24       # gallery rows per launch (the kernel takes N < 2^31; bounds inv_ng)
_QUERY_BLOCK = 1 << 15     # queries per launch: bounds the split workspace (splits x Q x k x 8 B)

# (q [M, d] bf16, g [n, d] bf16, inv_nq [M] | None, inv_ng [n] | None, k, n0, exclude, self_col0,
#  run_s [M, k], run_i [M, k], nonfinite [1] int32, splits | None) -> None, updating the lists.
Launch = Callable[..., None]


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def native_launch(q: Tensor, g: Tensor, inv_nq: Tensor | None, inv_ng: Tensor | None, k: int,
                  n0: int, exclude: bool, self_col0: int, run_s: Tensor, run_i: Tensor,
                  nonfinite: Tensor, splits: int | None = None) -> None:
    """One call of the CUDA launcher ``topk_fused_search`` (workspace allocated here)."""
    mod = native()
    M, d = q.shape
    n = g.shape[0]
    splits = int(splits or mod.topk_fused_default_splits(M, n))
    nbytes = int(mod.topk_fused_workspace_bytes(M, splits, k))
    workspace = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=q.device)
    with torch.cuda.device(q.device):
        mod.topk_fused_search(q.data_ptr(), g.data_ptr(), DTYPE_CODES[torch.bfloat16], M, n, d,
                              _ptr(inv_nq), _ptr(inv_ng), int(k), int(n0), bool(exclude),
                              int(self_col0), splits, workspace.data_ptr(), workspace.numel(),
                              run_s.data_ptr(), run_i.data_ptr(), nonfinite.data_ptr(), stream_of(q))


def unsupported(q: Tensor, g_dtype: torch.dtype, k: int) -> Unsupported | None:
    """Why this provider cannot serve these queries, gallery dtype and k, or None."""
    if q.device.type != "cuda":
        return Unsupported(f"tensors on {q.device} (the fused kernels are CUDA only)")
    if q.dtype != torch.bfloat16 or g_dtype != torch.bfloat16:
        return Unsupported(f"dtypes {q.dtype} / {g_dtype} (the fused kernels take bfloat16 for both)",
                           expected=True)
    if k > MAX_K:
        return Unsupported(f"k={k} is above the fused kernel's limit of {MAX_K}", expected=True)
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return Unsupported("a GPU older than compute capability 8.0 (bf16 mma.sync needs sm_80)")
    kmax = device_limits.topk_fused_kmax(k)
    short = device_limits.smem_shortfall(q.device, device_limits.TOPK_FUSED_SMEM[kmax],
                                         f"the fused search kernel for k={k} (lists of {kmax})")
    if short is not None:
        return Unsupported(short, expected=True)
    return None


def _positive(name: str, v: object) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


@without_autocast
def cosine_topk_fused(queries: Tensor, gallery: Tensor, k: int, normalize: bool = True,
                      exclude_self: bool = False, *, chunk_size: int | None = None,
                      query_block: int | None = None, splits: int | None = None,
                      launch: Launch | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine (``normalize=False``: inner-product) search of bf16 rows on the fused
    tensor-core kernels.

    Args:
        queries: [Q, d] bfloat16 tensor, on the gallery's device.
        gallery: [N, d] bfloat16 tensor.
        k: neighbours per query, 1 <= k <= min(N (N - 1 with ``exclude_self``), 128).
        normalize: scale the scores by both rows' inverse norms (zero rows score 0).
        exclude_self: query i is gallery row i: drop it from query i's results.
        chunk_size: gallery rows per launch (default 2^24).
        query_block: queries per launch (default 2^15).
        splits: gallery ranges per launch (default: the launcher's shape rule); the result does
            not depend on it.
        launch: the launch function (default :func:`native_launch`; tests pass the emulator's).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)``, sorted by score descending, ties to
        the lower gallery index.

    Raises:
        ValueError naming the argument: shapes, devices, dtypes, k, a NaN/inf input or score.
    """
    q = check_matrix(queries, "queries")
    g = check_matrix(gallery, "gallery")
    if g.device != q.device:
        raise ValueError(f"gallery: on {g.device}, but queries are on {q.device}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: has dim {g.shape[1]} but queries have dim {q.shape[1]}")
    if q.dtype != torch.bfloat16 or g.dtype != torch.bfloat16:
        raise ValueError(f"queries, gallery: the fused provider takes bfloat16 for both, got "
                         f"{q.dtype} / {g.dtype}")
    Q, N = q.shape[0], g.shape[0]
    if exclude_self and Q > N:
        raise ValueError(f"exclude_self: query i must be gallery row i, but there are {Q} queries "
                         f"and only {N} gallery rows")
    limit = min(N - 1 if exclude_self else N, MAX_K)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an integer in [1, {limit}] (gallery size"
                         f"{' - 1 with exclude_self' if exclude_self else ''}, at most {MAX_K}), "
                         f"got {k!r}")
    k = int(k)
    for name, v in (("chunk_size", chunk_size), ("query_block", query_block), ("splits", splits)):
        _positive(name, v)
    if launch is None:
        why = unsupported(q, g.dtype, k)
        if why is not None:
            raise ValueError(f"queries, gallery: the fused provider cannot serve them: {why.reason}")
        launch = native_launch
    q, g = q.contiguous(), g.contiguous()
    inv_nq = inv_row_norms(q, torch.float32) if normalize else None
    if not bool(torch.isfinite(q).all()) or (inv_nq is not None and not bool(torch.isfinite(inv_nq).all())):
        raise nonfinite_error({"queries": q})
    cols, rows = chunk_size or _MAX_CHUNK, query_block or _QUERY_BLOCK
    run_s = torch.full((Q, k), -math.inf, dtype=torch.float32, device=q.device)
    run_i = torch.full((Q, k), -1, dtype=torch.int64, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    # Once for the whole gallery (N floats), so a row's factor cannot depend on the chunking.
    inv_ng_all = inv_row_norms_stepped(g) if normalize else None
    for n0 in range(0, N, cols):  # ascending gallery order: the lists' tie rule needs it
        gb = g[n0:n0 + cols]
        inv_ng = None if inv_ng_all is None else inv_ng_all[n0:n0 + cols]
        for q0 in range(0, Q, rows):
            launch(q[q0:q0 + rows], gb, None if inv_nq is None else inv_nq[q0:q0 + rows], inv_ng, k, n0,
                   exclude_self, q0 - n0, run_s[q0:q0 + rows], run_i[q0:q0 + rows], flag, splits)
    if bool(flag.item()):  # one sync, at the end: the flag is sticky
        raise nonfinite_error({"queries": q, "gallery": g})
    return run_s, run_i
