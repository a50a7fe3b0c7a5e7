"""The "epilogue" provider of exact top-k cosine search: library GEMMs + our selection kernel.

Per (query block, gallery chunk) the raw score block ``S = q_block @ g_chunk.T`` comes from
``torch.mm`` (cuBLAS on CUDA), and one kernel (csrc/cuda/topk_epilogue*) applies the inverse
norms, skips each query's own row (``exclude_self``), flags NaN/inf scores and folds the block
into the running top-k lists of the block's queries, in place: sorted by score descending, ties
to the lower gallery index, padding (-inf, -1). Chunks are fed in gallery order, so one list per
query is the whole merge (no per-chunk candidate lists, no torch merge).

Blocks: about 8M scores (:func:`block_shape`): one fp32 score block (32 MiB) plus the gallery
chunk stays within the H100's 50 MB L2 between the GEMM that writes it and the kernel that reads
it, and each GEMM (8 GFLOP at d = 512) is long enough to hide the Python loop's overhead.

Operands and the exactness contract:

- float32 (also float16, or mixed dtypes: upcast to float32): the "exact" mode. Queries are
  normalized first and the chunk's inverse norms multiply the scores, as in
  :func:`bct_fast.ops.topk.cosine_topk`'s exact path, so given the same GEMM bits the result is
  that path's, bit for bit (tests/ops/test_topk_epilogue.py checks it on CPU with the PyTorch
  twin). TF32 is used only if the user enabled it in torch.
- bfloat16 queries and gallery: the GEMM reads the raw bf16 operands (exact products, fp32
  accumulation and output through ``torch.mm(..., out_dtype=torch.float32)``) and both inverse
  norms are applied in the kernel. The result is the exact top-k (ties to the lower index) of
  these fp32 scores, which differ from the fp32 path's scores of the same vectors by at most
  about ``d * 2^-23`` (summation order and normalization placement), so near-ties may rank
  differently. Screening with a proven bound plus exact fp32 rescoring of the candidates
  (:mod:`bct_fast.ops.topk_screen`) is the step that would make bf16 equal the fp32 result; its
  rescoring is a CPU, bitwise-probed product today, so it is not used here yet.
- float64: not served (the selection is fp32).

The selection function is injectable (:class:`Selector`): :data:`CUDA_SELECTOR` (the kernel, CUDA
tensors) or :data:`TORCH_SELECTOR` (the PyTorch twin, any device); so is the GEMM (``product``)
for tests that must reproduce another path's block bits.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from bct_fast._core.checks import check_matrix, nonfinite_error
from bct_fast._core.extension import cuda_kernels_compiled, native
from bct_fast.ops import topk_epilogue_torch
from bct_fast.ops.cpu_gemm import mm_nt
from bct_fast.ops.native_call import stream_of
from bct_fast.ops.providers import Unsupported
from bct_fast.ops.rows import inv_row_norms, normalize_rows

__all__ = ["cosine_topk_epilogue", "unsupported", "block_shape", "Selector", "CUDA_SELECTOR",
           "TORCH_SELECTOR", "MAX_K"]

MAX_K = 4096  # kTopkEpilogueMaxK (csrc/include/bct_fast/topk_epilogue.h)
_BLOCK_ELEMS = 1 << 23  # fp32 score block of 32 MiB: with the gallery chunk, inside 50 MB L2
_DEFAULT_COLS = 8192    # gallery rows per chunk (a multiple of the GEMM tile widths)

ProductFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Selector:
    """The selection function (signature of :func:`topk_epilogue_torch.select_block`)."""

    select: Callable[..., None]
    name: str


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_select(scores: Tensor, inv_nq: Tensor | None, inv_ng: Tensor | None, k: int, n0: int,
                 exclude: bool, self_col0: int, run_s: Tensor, run_i: Tensor,
                 nonfinite: Tensor) -> None:
    rows, cols = scores.shape
    with torch.cuda.device(scores.device):
        native().topk_epilogue_select(
            scores.data_ptr(), rows, cols, _ptr(inv_nq), _ptr(inv_ng), int(k), int(n0),
            bool(exclude), int(self_col0), run_s.data_ptr(), run_i.data_ptr(),
            nonfinite.data_ptr(), stream_of(scores))


CUDA_SELECTOR = Selector(_cuda_select, "cuda")
TORCH_SELECTOR = Selector(topk_epilogue_torch.select_block, "torch")


def default_selector(device: torch.device) -> Selector:
    """The kernel for CUDA tensors, the PyTorch twin elsewhere."""
    return CUDA_SELECTOR if device.type == "cuda" else TORCH_SELECTOR


def unsupported(q_dtype: torch.dtype, g_dtype: torch.dtype, k: int) -> Unsupported | None:
    """Why this provider cannot serve these dtypes and k, or None."""
    if torch.float64 in (q_dtype, g_dtype):
        return Unsupported("float64 inputs (the epilogue selects in fp32)", expected=True)
    if k > MAX_K:
        return Unsupported(f"k={k} is above the epilogue kernel's limit of {MAX_K}")
    return None


def block_shape(Q: int, N: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(gallery rows per chunk, queries per block): about 8M scores per block."""
    cols = chunk_size or min(N, _DEFAULT_COLS)
    return cols, max(1, min(Q, _BLOCK_ELEMS // cols))


def default_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` as fp32: cuBLAS (bf16 x bf16 -> fp32 output where torch has ``out_dtype``),
    oneDNN / MKL on a CPU (bf16 upcast there: exact products, the same arithmetic)."""
    if a.dtype == torch.bfloat16:
        if a.is_cuda:
            try:
                return torch.mm(a, b.T, out_dtype=torch.float32)
            except TypeError:  # a torch without mm(out_dtype=): exact upcast, slower
                pass
        a, b = a.float(), b.float()
    return torch.mm(a, b.T) if a.is_cuda else mm_nt(a, b)


def _operand_dtype(q: Tensor, g: Tensor) -> torch.dtype:
    """bf16 only when both are bf16 (the bf16 GEMM mode); everything else runs in fp32."""
    return torch.bfloat16 if q.dtype == g.dtype == torch.bfloat16 else torch.float32


def _check_args(q: Tensor, g: Tensor, k: object, exclude_self: bool,
                chunk_size: object, query_block: object) -> int:
    if g.device != q.device:
        raise ValueError(f"gallery: on {g.device}, but queries are on {q.device}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: has dim {g.shape[1]} but queries have dim {q.shape[1]}")
    Q, N = q.shape[0], g.shape[0]
    if exclude_self and Q > N:
        raise ValueError(f"exclude_self: query i must be gallery row i, but there are {Q} queries "
                         f"and only {N} gallery rows")
    why = unsupported(q.dtype, g.dtype, 1)
    if why is not None:
        raise ValueError(f"queries, gallery: the epilogue provider cannot serve them: {why.reason}")
    limit = min(N - 1 if exclude_self else N, MAX_K)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= limit:
        raise ValueError(f"k: expected an integer in [1, {limit}] (gallery size"
                         f"{' - 1 with exclude_self' if exclude_self else ''}, at most {MAX_K}), "
                         f"got {k!r}")
    for name, v in (("chunk_size", chunk_size), ("query_block", query_block)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(k)


def cosine_topk_epilogue(queries: Tensor, gallery: Tensor, k: int, normalize: bool = True,
                         exclude_self: bool = False, chunk_size: int | None = None,
                         selector: Selector | None = None, *, query_block: int | None = None,
                         product: ProductFn | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine (or, with ``normalize=False``, inner-product) search through library
    GEMMs and the selection kernel (or its PyTorch twin: ``selector``, default by device).

    Args:
        queries: [Q, d] tensor (fp32 / fp16 / bf16), on the gallery's device.
        gallery: [N, d] tensor.
        k: neighbours per query, 1 <= k <= min(N (N - 1 with ``exclude_self``), 4096).
        normalize: L2-normalize both sides (zero rows score 0 against everything).
        exclude_self: query i is gallery row i: drop it from query i's results.
        chunk_size: gallery rows per score block (default 8192).
        selector: :data:`CUDA_SELECTOR` / :data:`TORCH_SELECTOR` (default: by device).
        query_block: queries per score block (default: ~8M scores per block).
        product: ``(a [M, d], b [n, d]) -> a @ b.T`` as fp32 (default :func:`default_product`).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)``, sorted by score descending, ties to
        the lower gallery index (module docstring: which scores, per operand dtype).

    Raises:
        ValueError naming the argument: shapes, devices, k, dtypes, a NaN/inf input or score.
    """
    q = check_matrix(queries, "queries")
    g = check_matrix(gallery, "gallery")
    k = _check_args(q, g, k, exclude_self, chunk_size, query_block)
    sel = selector or default_selector(q.device)
    if sel is CUDA_SELECTOR and (q.device.type != "cuda" or not cuda_kernels_compiled()):
        raise ValueError("selector: the CUDA selection kernel needs CUDA tensors and a build "
                         "with CUDA kernels")
    mm = product or default_product
    Q, N = q.shape[0], g.shape[0]
    op = _operand_dtype(q, g)
    if op == torch.bfloat16:
        qn, g_op = q.contiguous(), g.contiguous()
        inv_nq = inv_row_norms(q, torch.float32) if normalize else None
    else:
        qn = q.to(torch.float32)
        qn = (normalize_rows(qn) if normalize else qn).contiguous()
        g_op, inv_nq = g.contiguous(), None
    if not bool(torch.isfinite(qn).all()) or (inv_nq is not None and not bool(torch.isfinite(inv_nq).all())):
        raise nonfinite_error({"queries": q})
    cols, rows = block_shape(Q, N, chunk_size)
    rows = query_block or rows
    run_s = torch.full((Q, k), -math.inf, dtype=torch.float32, device=q.device)
    run_i = torch.full((Q, k), -1, dtype=torch.int64, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    # Gallery-chunk-major: each chunk is read once; every query block's list stays resident.
    for n0 in range(0, N, cols):
        gb = g_op[n0:n0 + cols].to(op)  # a row slice of a contiguous gallery: contiguous
        # fp32: the exact path's own call (same bits); bf16: norms accumulated in fp32
        inv_ng = inv_row_norms(gb, torch.float32 if op == torch.bfloat16 else None) if normalize else None
        for q0 in range(0, Q, rows):
            s = mm(qn[q0:q0 + rows], gb)
            sel.select(s, None if inv_nq is None else inv_nq[q0:q0 + rows], inv_ng, k, n0,
                       exclude_self, q0 - n0, run_s[q0:q0 + rows], run_i[q0:q0 + rows], flag)
    if bool(flag.item()):  # one sync, at the end: the flag is sticky
        raise nonfinite_error({"queries": q, "gallery": g})
    return run_s, run_i
