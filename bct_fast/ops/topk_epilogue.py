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
  differently. ``screen=True`` (below) ranks any of these inputs by float64 cosines instead.
- float64: not served (the selection is fp32).

Screened mode (``screen=True``, any fp32 / fp16 / bf16 inputs, which are upcast to fp32): the
contract is stronger than the fp32 exact mode's and device-independent: the top-k (ties to the
lower index) of :func:`cosine64`, the cosines of the given vectors computed in float64 in one
fixed order (products exact, a pairwise sum, IEEE sqrt and division: the same bits on any
device), within ``(2 ceil(log2 d) + 5) 2^-53`` of the exact cosines; scores are those float64
cosines rounded to fp32. Steps (:func:`_screened`): bf16 score blocks on the tensor cores, each
query's ``k_screen = min(2k + 64, 4096)`` best screened scores kept by the same selection, the
bound below picks every row that may be in the top-k, and those are rescored by
:func:`cosine64`. A query whose window overflows its ``k_screen`` list (near-ties, duplicates)
goes to a second pass screened by float64 GEMM scores (error ~2^-24), and one that overflows
that too (more than ``2k + 1024`` rows within ~1e-7 of its k-th score: duplicates) to a float64
scan of the whole gallery in the fixed order (slow; bounded memory).

The bound of the screened mode (|S - c64| per query, S the screened score of a pair)
-------------------------------------------------------------------------------------
Notation: ``q``, ``g`` the given rows (fp32), ``qh = q/|q|``, ``gh = g/|g|`` the exact unit rows
(``normalize=False``: ``qh = q``, ``gh = g``), C = qh.gh the exact score, c64 = cosine64 (or
the float64 dot). Screened operands: ``q' = bf16(fl64(qh))``; ``h = fl32(g inv)`` with the fp32
inverse norm ``inv`` of :func:`bct_fast.ops.rows.inv_row_norms` (``h = g`` without normalize),
``h' = bf16(h)``. S = the fp32-accumulated product of q' and h' (torch.mm with
``out_dtype=float32`` on CUDA, an fp32 GEMM of the upcast bf16 values on a CPU: products of two
bf16 numbers are exact in fp32 either way, no output rounding). u32 = 2^-24, u_acc = 2^-23,
gamma_d = d u_acc / (1 - d u_acc) (topk_screen's accumulation model, checked on CUDA by
:func:`bct_fast.ops.topk_screen.bf16_product_is_fp32_accumulated`).

- Accumulation: |S - q'.h'| <= gamma_d sum|q'_t h'_t| <= gamma_d |q'| |h'|.
- Inputs: q'.h' - qh.gh = (q' - qh).h' + qh.(h' - gh), so (Cauchy-Schwarz, |qh| = 1)
  |q'.h' - qh.gh| <= e_q |h'| + |h' - gh| with e_q = |q' - qh|, measured per query in float64.
- The gallery side: |h' - gh| <= |h' - h| + |h - g inv| + |g inv - gh| <= dh + u32 G + R, where
  dh = |h - h'| is measured (fp32, exact differences, the norm rounded up), G = |g| inv = 1 + rho
  and |rho| <= R = (d + 8) u_acc (an fp32 sum of squares, a correctly rounded sqrt and
  reciprocal: |rho| <= gamma_d / 2 + 2 u32; R doubles it, as topk_screen's h_max does), and
  |h'| <= H + DH with H = (1 + R)(1 + u32) (the maxima over the gallery of |h|, dh).
- Output: none (fp32 scores). Flushed subnormals: tau = (3d + 4) 2^-124 (1 + |q'| + H + DH).
- The contract's scores: |c64 - C| <= e64 = (2 ceil(log2 d) + 5) 2^-53 (1.01) (pairwise sums of
  exact products: ceil(log2 d) u64 relative to sum|p| <= |q||g|; norms, product, division).

So |S - c64| <= eps = e_q (H + DH) + DH + u32 G + R + gamma_d |q'| (H + DH) + tau + e64, inflated
by 2^-20 for its own float64 evaluation. ``normalize=False``: eps = e_q (H + DH) + |q| DH +
gamma_d |q'| (H + DH) + tau + e64 |q| H with H = max |g| (measured, rounded up) and the float64
e64 of the plain dot. At d = 512 and unit rows eps is ~0.004 (e_q, dh ~ 0.5 u_bf16 measured).
The window (topk_screen's argument with c = 0): T = the k-th screened score of a query; the k
rows with the largest S have c64 >= T - eps, so the k-th largest c64 is >= T - eps, and any row
of the c64 top-k has S >= T - 2 eps: keeping every row with S >= T - 2 eps keeps the top-k, and
the list holds them all if its last score is below T - 2 eps (or it holds every rankable row).
The float64-GEMM pass uses the same rule with eps2 = u32 (1 + 2^-10) + 4 (d + 8) 2^-52 + e64
(fp32 rounding of the float64 score for the selection, float64 normalization and GEMM).

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

from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import check_matrix, nonfinite_error
from bct_fast._core.extension import cuda_kernels_compiled, native
from bct_fast.ops import topk_epilogue_torch, topk_screen
from bct_fast.ops.cpu_gemm import mm_f32, mm_nt
from bct_fast.ops.native_call import stream_of
from bct_fast.ops.providers import Unsupported
from bct_fast.ops.rows import inv_row_norms, inv_row_norms_stepped, normalize_rows
from bct_fast.ops.topk_select import topk_lowest_index_ties

__all__ = ["cosine_topk_epilogue", "unsupported", "block_shape", "Selector", "CUDA_SELECTOR",
           "TORCH_SELECTOR", "MAX_K", "cosine64", "screen_eps", "screen_stats"]

MAX_K = 4096  # kTopkEpilogueMaxK (csrc/include/bct_fast/topk_epilogue.h)
_BLOCK_ELEMS = 1 << 23  # fp32 score block of 32 MiB: with the gallery chunk, inside 50 MB L2
_DEFAULT_COLS = 8192    # gallery rows per chunk (a multiple of the GEMM tile widths)

_F64_ELEMS = 1 << 25    # float64 temporaries of the rescoring / float64 scan (256 MiB)
_EPS_SCALE = 1.0        # tests only: a bound scaled down must give wrong answers (negative control)

ProductFn = Callable[[Tensor, Tensor], Tensor]
screen_stats: dict = {}  # the last screened call: queries per pass, rescored candidates (tests, benchmarks)


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
    if a.is_cuda:
        return mm_f32(a, b.T)
    if a.dtype == torch.bfloat16:
        a, b = a.float(), b.float()
    return mm_nt(a, b)


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


@without_autocast
def cosine_topk_epilogue(queries: Tensor, gallery: Tensor, k: int, normalize: bool = True,
                         exclude_self: bool = False, chunk_size: int | None = None,
                         selector: Selector | None = None, *, query_block: int | None = None,
                         product: ProductFn | None = None,
                         screen: bool | None = None) -> tuple[Tensor, Tensor]:
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
        product: ``(a [M, d], b [n, d]) -> a @ b.T`` as fp32 (default :func:`default_product`;
            with ``screen``: the bf16 screen's product, which must accumulate in fp32).
        screen: the screened mode (module docstring): bf16 screen, float64 rescoring; the
            result is the top-k of :func:`cosine64` on any device. None (default) and False:
            off (opt-in until a GPU run has measured it).

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)``, sorted by score descending, ties to
        the lower gallery index (module docstring: which scores, per operand dtype and mode).

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
    if screen is not None and not isinstance(screen, bool):
        raise ValueError(f"screen: expected True, False or None, got {screen!r}")
    mm = product or default_product
    Q, N = q.shape[0], g.shape[0]
    if screen:
        if not bool(torch.isfinite(q).all()):
            raise nonfinite_error({"queries": q})
        cols, rows = block_shape(Q, N, chunk_size)
        return _screened(q, g, k, normalize, exclude_self, cols, query_block or rows, sel, product)
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
    # Every inverse gallery norm up front: one host check per million rows, not one per chunk.
    inv_ng_all = inv_row_norms_stepped(g_op, torch.float32) if normalize else None
    run_s = torch.full((Q, k), -math.inf, dtype=torch.float32, device=q.device)
    run_i = torch.full((Q, k), -1, dtype=torch.int64, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    # Each query block's views, made once: the loop below runs ~12k times at the goal row, where
    # the first GPU run measured ~48 us per iteration for ~20 us of GPU work.
    qblocks = [(q0, qn[q0:q0 + rows], None if inv_nq is None else inv_nq[q0:q0 + rows],
                run_s[q0:q0 + rows], run_i[q0:q0 + rows]) for q0 in range(0, Q, rows)]
    # Gallery-chunk-major: each chunk is read once; every query block's list stays resident.
    for n0 in range(0, N, cols):
        gb = g_op[n0:n0 + cols].to(op)  # a row slice of a contiguous gallery: contiguous
        inv_ng = None if inv_ng_all is None else inv_ng_all[n0:n0 + cols]
        for q0, qb, inq, rs, ri in qblocks:
            sel.select(mm(qb, gb), inq, inv_ng, k, n0, exclude_self, q0 - n0, rs, ri, flag)
    if bool(flag.item()):  # one sync, at the end: the flag is sticky
        raise nonfinite_error({"queries": q, "gallery": g})
    return run_s, run_i


# ---- the screened mode (module docstring) -------------------------------------------------------

def _pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


def _pairwise_sum(x: Tensor) -> Tensor:
    """Sum over the last dim in one fixed pairwise order (zero padded to a power of two): separate
    IEEE adds, so the same float64 bits on any device (a reduction kernel picks its own order)."""
    n = x.shape[-1]
    if _pow2(n) != n:
        x = torch.nn.functional.pad(x, (0, _pow2(n) - n))
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def cosine64(q: Tensor, g: Tensor, normalize: bool = True) -> Tensor:
    """The screened mode's scores: query rows ``q`` [M, d] against gallery rows ``g`` [m, d]
    (shared) or [M, m, d] (per query), [M, m] float64.

    Products of two fp32 (or narrower) numbers are exact in float64; sums run in the fixed
    pairwise order of :func:`_pairwise_sum`, then ``dot / (|q| |g|)`` with IEEE sqrt and division
    (zero rows: 0). Within ``(2 ceil(log2 d) + 5) 2^-53`` of the exact cosine, and bitwise the
    same on every device and for every batch shape. ``normalize=False``: the dot alone."""
    q64, g64 = q.double(), g.double()
    dot = _pairwise_sum(q64[:, None, :] * g64)
    if normalize:
        nq = _pairwise_sum(q64 * q64).sqrt()
        ng = _pairwise_sum(g64 * g64).sqrt()
        den = nq[:, None] * ng
        dot = torch.where(den > 0, dot / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(dot))
    return dot + 0.0  # -0 -> +0: a zero score has one representation


def _e64(d: int) -> float:
    """|cosine64 - exact| for unit rows (module docstring)."""
    return (2 * max(0, (d - 1).bit_length()) + 5) * 2.0 ** -53 * 1.01


def screen_eps(e_q: Tensor, nq16: Tensor, nq: Tensor, dh: float, h: float, d: int,
               normalize: bool) -> Tensor:
    """Per query [Q] float64: the bound ``eps`` on |S - cosine64| of the bf16 screen (module
    docstring). ``e_q = |q' - qh|``, ``nq16 = |q'|``, ``nq = |q|`` (float64, per query);
    ``dh = max |h - h'|`` and ``h = max |g|`` (used without ``normalize``) over the gallery."""
    u32, uacc = topk_screen.U_FP32, topk_screen.U_ACC
    gamma = d * uacc / (1 - d * uacc)
    if normalize:
        R = (d + 8) * uacc
        H = (1 + R) * (1 + u32)
        a = e_q * (H + dh) + dh + u32 * (1 + R) + R + gamma * nq16 * (H + dh) + _e64(d)
    else:
        H = h
        a = e_q * (H + dh) + nq * dh + gamma * nq16 * (H + dh) + _e64(d) * nq * H
    tau = (3 * d + 4) * 2.0 ** -124 * (1 + nq16 + H + dh)  # subnormals flushed by the tensor cores
    return (a + tau) * (1 + 2.0 ** -20) + 2.0 ** -100  # + its own float64 evaluation


def _max_norm(t: Tensor) -> Tensor:
    """Largest row norm of an fp32 tensor as a 0-d float64 tensor, rounded up past its own error
    (topk_screen's rule); NaN / inf rows give NaN / inf. No sync: maxima stay on the device."""
    d = t.shape[1]
    n = torch.linalg.vector_norm(t, dim=1).amax().double()
    return n * (1 + (d + 8) * topk_screen.U_ACC) + math.sqrt(d) * 2.0 ** -62


def _window(run_s: Tensor, run_i: Tensor, k: int, eps: Tensor, holds_all: bool,
            n_total: int) -> tuple[Tensor, Tensor]:
    """``(ok [R] bool, cand [R_ok, m])``: which queries' lists hold every row that may be in
    their top-k (every row with S >= T - 2 eps), and those rows' indices, ascending, -1 pads."""
    v = run_s.double()
    lo = v[:, k - 1] - 2 * eps
    keep = v >= lo[:, None]
    ok = torch.isfinite(lo) & (torch.ones_like(keep[:, 0]) if holds_all else v[:, -1] < lo)
    keep, idx = keep[ok], run_i[ok]
    m = max(int(keep.sum(1).max()), 1) if keep.shape[0] else 1
    cand = torch.where(keep, idx, torch.full_like(idx, n_total)).sort(dim=1).values[:, :m]
    return ok, cand.masked_fill(cand == n_total, -1)


def _rescore64(q: Tensor, g: Tensor, cand: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Top-k by :func:`cosine64` of query rows ``q`` over their candidates ``cand`` [M, m]
    (ascending indices, -1 pads; at least k real ones), in groups of bounded float64 size."""
    M, m = cand.shape
    step = max(1, _F64_ELEMS // (m * _pow2(q.shape[1])))
    s = torch.empty(M, m, dtype=torch.float64, device=q.device)
    safe = cand.clamp_min(0)
    for r0 in range(0, M, step):
        sub = safe[r0:r0 + step]
        s[r0:r0 + step] = cosine64(q[r0:r0 + step], g[sub.reshape(-1)].view(sub.shape[0], m, -1), normalize)
    s.masked_fill_(cand < 0, -math.inf)
    top, col = topk_lowest_index_ties(s, k)  # columns are in index order: ties to the lower index
    return top, cand.gather(1, col)


def _drop_own(run_s: Tensor, run_i: Tensor, own: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The lists without each query's own row (if present), cut to ``width``."""
    order = torch.sort((run_i == own[:, None]).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return run_s.gather(1, order), run_i.gather(1, order)


def _f64_screen(q: Tensor, qidx: Tensor, g: Tensor, k: int, normalize: bool, exclude_self: bool,
                cols: int, sel: Selector) -> tuple[Tensor, Tensor, Tensor]:
    """Second pass: float64 GEMM scores (rounded to fp32 for the selection) of query rows ``q``
    (indices ``qidx``), window eps2 (module docstring). ``(ok, cand, nonfinite flag)``."""
    (F, d), N = q.shape, g.shape[0]
    rankable = N - 1 if exclude_self else N
    width = min(rankable, 2 * k + 1024)
    wl = min(N, width + int(exclude_self))  # room for the own row: dropped afterwards
    sel = sel if wl <= MAX_K else TORCH_SELECTOR
    q64 = q.double()
    nq = torch.linalg.vector_norm(q64, dim=1)
    if normalize:
        q64 = q64 / torch.where(nq > 0, nq, torch.ones_like(nq))[:, None]
    run_s = torch.full((F, wl), -math.inf, dtype=torch.float32, device=q.device)
    run_i = torch.full((F, wl), -1, dtype=torch.int64, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    h_max = torch.zeros((), dtype=torch.float64, device=q.device)
    rows = max(1, min(F, _BLOCK_ELEMS // cols))
    for n0 in range(0, N, cols):
        gb = g[n0:n0 + cols].double()
        ng = torch.linalg.vector_norm(gb, dim=1)
        if normalize:
            gb = gb / torch.where(ng > 0, ng, torch.ones_like(ng))[:, None]
        else:
            h_max = torch.maximum(h_max, ng.amax())
        for r0 in range(0, F, rows):
            s = (q64[r0:r0 + rows] @ gb.T).float()
            sel.select(s, None, None, wl, n0, False, 0, run_s[r0:r0 + rows], run_i[r0:r0 + rows], flag)
    if exclude_self:
        run_s, run_i = _drop_own(run_s, run_i, qidx, width)
    # |q| max|g| scales every term without normalize (unit rows: 1)
    scale = torch.ones_like(nq) if normalize else nq * float(h_max) * (1 + 2.0 ** -40)
    eps = ((topk_screen.U_FP32 * (1 + 2.0 ** -10) + 4 * (d + 8) * 2.0 ** -52 + _e64(d)) * scale
           + 2.0 ** -140) * _EPS_SCALE
    ok, cand = _window(run_s, run_i, k, eps, width >= rankable, N)
    return ok, cand, flag


def _f64_scan(q: Tensor, qidx: Tensor, g: Tensor, k: int, normalize: bool,
              exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Last resort: :func:`cosine64` of query rows ``q`` against every gallery row, running
    top-k in float64 (ties to the lower index); float64 temporaries of bounded size."""
    (F, d), N = q.shape, g.shape[0]
    p = _pow2(d)
    rows = max(1, min(F, _F64_ELEMS // (p * 1024)))
    cols = max(1, min(N, _F64_ELEMS // (p * rows)))
    out_s = torch.empty(F, k, dtype=torch.float64, device=q.device)
    out_i = torch.empty(F, k, dtype=torch.int64, device=q.device)
    for r0 in range(0, F, rows):
        qb, own = q[r0:r0 + rows], qidx[r0:r0 + rows]
        best_s = torch.full((qb.shape[0], 0), -math.inf, dtype=torch.float64, device=q.device)
        best_i = torch.full((qb.shape[0], 0), -1, dtype=torch.int64, device=q.device)
        for n0 in range(0, N, cols):
            s = cosine64(qb, g[n0:n0 + cols], normalize)
            idx = torch.arange(n0, n0 + s.shape[1], device=q.device).expand(s.shape[0], -1)
            if exclude_self:
                s = s.masked_fill(idx == own[:, None], -math.inf)
            s_all, i_all = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
            best_s, col = topk_lowest_index_ties(s_all, min(k, s_all.shape[1]))  # list first: lower indices
            best_i = i_all.gather(1, col)
        out_s[r0:r0 + rows], out_i[r0:r0 + rows] = best_s, best_i
    return out_s, out_i


def _screened(q: Tensor, g: Tensor, k: int, normalize: bool, exclude_self: bool, cols: int,
              rows: int, sel: Selector, product: ProductFn | None) -> tuple[Tensor, Tensor]:
    """The screened mode: bf16 screen, float64 rescoring of the window; the float64-GEMM pass and
    the float64 scan for the queries whose window overflowed (module docstring)."""
    (Q, d), N = q.shape, g.shape[0]
    dev = q.device
    rankable = N - 1 if exclude_self else N
    q32 = q.to(torch.float32)
    q64 = q32.double()
    nq = torch.linalg.vector_norm(q64, dim=1)
    qh = q64 / torch.where(nq > 0, nq, torch.ones_like(nq))[:, None] if normalize else q64
    out_s = torch.zeros(Q, k, dtype=torch.float32, device=dev)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=dev)
    stats = {"queries": Q, "screened": 0, "f64_gemm": 0, "f64_scan": 0, "candidates": 0, "zero": 0}
    # Zero queries score 0 against every row: the k lowest rankable indices, no search needed.
    zero = nq == 0
    if bool(zero.any()):
        zr = zero.nonzero()[:, 0]
        base = torch.arange(min(k + 1, N), device=dev).expand(zr.numel(), -1)
        out_i[zr] = _drop_own(base.double(), base, zr if exclude_self else torch.full_like(zr, -1), k)[1]
        stats["zero"] = int(zr.numel())
    todo = (~zero).nonzero()[:, 0]
    width = min(rankable, 2 * k + 64, MAX_K)
    mm = product or default_product
    model_ok = product is not None or dev.type != "cuda" or topk_screen.bf16_product_is_fp32_accumulated(dev)
    if todo.numel() and model_ok and (width > k or width >= rankable):
        q16 = qh.to(torch.bfloat16)
        e_q = torch.linalg.vector_norm(q16.double() - qh, dim=1) * (1 + 2.0 ** -40)
        nq16 = torch.linalg.vector_norm(q16.double(), dim=1) * (1 + 2.0 ** -40)
        run_s = torch.full((Q, width), -math.inf, dtype=torch.float32, device=dev)
        run_i = torch.full((Q, width), -1, dtype=torch.int64, device=dev)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        dh = torch.zeros((), dtype=torch.float64, device=dev)
        h_max = torch.zeros((), dtype=torch.float64, device=dev)
        # Once for the whole gallery (one host check per 1M rows), not one per chunk.
        inv_ng = inv_row_norms_stepped(g) if normalize else None
        for n0 in range(0, N, cols):
            gb = g[n0:n0 + cols].to(torch.float32)
            h = gb * inv_ng[n0:n0 + cols, None] if normalize else gb
            h16 = h.to(torch.bfloat16)
            # the maxima stay on the device (no sync per chunk); NaN / inf propagate into them
            dh = torch.maximum(dh, _max_norm(h - h16.float()))
            if not normalize:
                h_max = torch.maximum(h_max, _max_norm(h))
            for q0 in range(0, Q, rows):
                sel.select(mm(q16[q0:q0 + rows], h16), None, None, width, n0, exclude_self, q0 - n0,
                           run_s[q0:q0 + rows], run_i[q0:q0 + rows], flag)
        if bool(flag.item()) or not math.isfinite(float(dh)):
            raise nonfinite_error({"queries": q, "gallery": g})
        eps = screen_eps(e_q, nq16, nq * (1 + 2.0 ** -40), float(dh), float(h_max), d, normalize) * _EPS_SCALE
        ok, cand = _window(run_s[todo], run_i[todo], k, eps[todo], width >= rankable, N)
        done = todo[ok]
        if done.numel():
            s, i = _rescore64(q32[done], g, cand, k, normalize)
            out_s[done], out_i[done] = s.float(), i
        stats["screened"], stats["candidates"] = int(done.numel()), int((cand >= 0).sum())
        todo = todo[~ok]
    if todo.numel():  # windows that overflowed (near-ties, duplicates) or no screen
        ok, cand, flag = _f64_screen(q32[todo], todo, g, k, normalize, exclude_self, cols, sel)
        if bool(flag.item()):
            raise nonfinite_error({"queries": q, "gallery": g})
        done = todo[ok]
        if done.numel():
            s, i = _rescore64(q32[done], g, cand, k, normalize)
            out_s[done], out_i[done] = s.float(), i
        stats["f64_gemm"] = int(done.numel())
        todo = todo[~ok]
    if todo.numel():  # more than 2k + 1024 rows within ~1e-7 of the k-th score
        s, i = _f64_scan(q32[todo], todo, g, k, normalize, exclude_self)
        out_s[todo], out_i[todo] = s.float(), i
        stats["f64_scan"] = int(todo.numel())
    screen_stats.clear()
    screen_stats.update(stats)
    return out_s, out_i
