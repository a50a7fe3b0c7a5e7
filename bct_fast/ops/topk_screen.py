"""Exact top-k through a bf16 screen: bf16 scores with a proven error bound pick the candidates,
fp32 rescoring of the candidates gives the fp32 exact answer (issue 16).

``cosine_topk``'s exact path scores every (query, gallery row) pair with an fp32 GEMM. Here each
query block is first scored against each gallery chunk with bf16 operands (fp32 accumulation: on
an AVX512-BF16 CPU that GEMM runs ~2.2x faster). Every pair whose screened score could still be
in the fp32 top-k (by the bound below) is kept, those few are rescored with the exact path's
own fp32 product, and the top-k of the rescored pairs is returned: the same scores (bitwise) and
indices, ties to the lower index, as the exact path. Only torch ops are used; the CPU specifics
(the C++ running selector, the bf16 product's output dtype) are chosen by device.

The bound
---------
Notation: ``q`` a query row and ``g`` a gallery row as the exact path sees them (fp32; ``q``
normalized when ``normalize``), ``inv`` the exact path's fp32 inverse norm of ``g`` (1 without
``normalize``), ``h = fl32(g * inv)`` the row that is screened, ``q'``, ``h'`` their bf16
roundings, ``dq = q - q'``, ``dh = h - h'`` (both exact in fp32). u = 2^-8 (bf16 unit
roundoff), u32 = 2^-24, u_acc = 2^-23 (fp32 accumulation; twice the RNE unit so truncating
accumulators are covered too), gamma_d = d u_acc / (1 - d u_acc).

- The exact path computes ``E = fl32(x * inv)`` with ``x`` an fp32 GEMM of ``q . g`` in some
  order: |x - q.g| <= gamma_d |q||g| (any summation order / FMA), so
  |E - q.(g inv)| <= (gamma_d + u32 (1 + gamma_d)) |q| G with G = |g| inv; and
  |q.h - q.(g inv)| <= u32 |q| G (the rounding of h).
- Screen inputs: q'.h' - q.h = -(q'.dh + dq.h), so |q'.h' - q.h| <= |q'||dh| + |dq||h|
  (Cauchy-Schwarz; exact algebra, no rounding model needed).
- Screen accumulation: products of two bf16 numbers are exact in fp32 (8 + 8 <= 24 bits), the
  fp32 sum of d of them is off by <= gamma_d sum|q'_t h'_t| <= gamma_d |q'| (|h| + |dh|).
- Screen output: the CPU bf16 GEMM rounds its fp32 accumulator ``acc`` to bf16 (RNE):
  |S - acc| <= u |acc| <= c |S| with c = u / (1 - u); c = 0 where the product returns fp32.
- Subnormal flushing (DAZ/FTZ in the bf16 dot-product instructions) and norms computed in
  finite precision add tiny absolute terms (tau below) and a relative inflation of 2^-20.

So ``|S - E| <= a + c|S|`` with, per query and over every gallery row seen,
``a = |q'| max|dh| + |dq| max|h| + gamma_d |q'| (max|h| + max|dh|) + (2 gamma_d + 3 u32) |q| max G
+ tau``, inflated by 2^-20. For unit rows the worst case (|dq| <= u|q|, ...) is
a + c|S| <= 3u + 3u^2 + 3 gamma_d + O(u32) = 0.0118 at d = 128, 0.0122 at d = 1024
(``unit_row_bound``). The bound used is tighter: |dh| and |dq| are measured, not assumed
(~0.5u on random rows), and the output term scales with the score, not with 1.
With ``normalize=False`` the same bound holds with the raw norms (it scales with |q| max|g|).

Why the kept set contains the exact top-k
-----------------------------------------
Each screened score gives an interval for the exact score: L(S) = S - a - c|S| <= E <=
S + a + c|S| = U(S), and both L and U increase with S. Let T be the k-th largest screened score
of a query and lam = L(T). The k rows with the k largest S all have E >= L(S) >= lam, so the
k-th largest exact score E_(k) >= lam. Any row in the exact top-k (whatever the tie rule: it
only needs E_j >= E_(k)) has U(S_j) >= E_j >= E_(k) >= lam. So keeping every row with
U(S_j) >= lam keeps the whole exact top-k; the exact top-k of the kept rows, with ties to the
lower index, is then the exact top-k of all rows. For ``a`` and ``c`` constant per query this is
``S_j + c|S_j| >= T - c|T| - 2a`` (``S_j >= T - 2 eps`` when c = 0).

Merging chunks: the screen keeps, per query, its ``k_screen`` (> k) largest screened scores over
all chunks (a running selector: the C++ one on a CPU), and the rule is applied once at the end,
when T is final. The kept set holds every row with U(S) >= lam only if the ``k_screen``-th score
is already below the window (U(S_(k_screen)) < lam, or every row was kept); a query where it is
not (many near-ties, duplicates: "candidate explosion") is searched exactly instead, in a second
pass, so memory stays bounded by ``k_screen`` per query.

Bitwise-identical rescoring
---------------------------
The exact path's fp32 score of a pair depends on how its GEMM orders the sum. oneDNN's and MKL's
CPU GEMMs compute each output element independently of the other rows and columns of the call
(for >= 2 rows and >= 2 columns: a 1-column call takes a GEMV kernel that sums differently), so
the candidate rows gathered into a small product give the same bits as the big block. That is
an implementation property, not a guarantee, so :func:`rescore_product` checks it once per
block shape against the exact path's own block product on random data, and screening is not
used for a shape where no product reproduces it. Normalization is the exact path's: the same
fp32 inverse norms (computed per chunk, kept), applied by one fp32 multiply.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from bct_fast.ops import topk_select
from bct_fast.ops.cpu_gemm import onednn_active
from bct_fast.ops.topk_select import NonFiniteScores, topk_lowest_index_ties

__all__ = ["ScreenedSearch", "GalleryTerms", "chunk_terms", "screen_bound_terms", "unit_row_bound",
           "rescore_product", "Rescorer", "screen_mode", "screen_product", "bf16_product_is_fp32_accumulated",
           "default_k_screen"]

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24
U_ACC = 2.0 ** -23
_INFLATE = 1.0 + 2.0 ** -20
_HUGE = 2.0 ** 120  # |q| |g| above this: partial sums may overflow fp32 (the bound's model breaks)
_EPS_SCALE = 1.0  # tests only: a bound too small must give wrong answers (negative control)
_GROUP_SIZES = (2, 4, 8, 16, 32, 64)  # queries per rescoring product (each checked by the probe)

ProductFn = Callable[[Tensor, Tensor], Tensor]


def screen_mode() -> str:
    """``BCT_FAST_SCREEN``: ``auto`` (default: where it measured faster), ``1`` (whenever it can
    apply), ``0`` (never)."""
    v = os.environ.get("BCT_FAST_SCREEN", "auto").strip().lower()
    return {"1": "on", "on": "on", "0": "off", "off": "off"}.get(v, "auto")


def default_k_screen(k: int, n_total: int) -> int:
    """Screened scores kept per query: room for the window around the k-th score on random
    data (~1.5-3k rows at d = 128..1024) before a query falls back to the exact pass."""
    return min(n_total, 2 * k + 64)


def _gamma(d: int) -> float:
    return d * U_ACC / (1.0 - d * U_ACC)


def unit_row_bound(d: int) -> float:
    """Worst-case |screened - exact| for unit rows (any data), the constant ``eps`` of issue 16:
    |q| <= 1 + 2^-20, |h| <= 1 + (d + 8) u_acc, |dq| <= u|q|, |dh| <= u|h|, |q'| <= (1 + u)|q|,
    and |S| <= (1 + a) / (1 - c) in the output term."""
    g = _gamma(d)
    nq, nh = 1 + 2.0 ** -20, 1 + (d + 8) * U_ACC
    a = ((1 + U_BF16) * nq * U_BF16 * nh + U_BF16 * nq * nh + g * (1 + U_BF16) ** 2 * nq * nh
         + (2 * g + 3 * U_FP32) * nq * nh * (1 + 4 * U_FP32))
    c = U_BF16 / (1 - U_BF16)
    return (a + c * (nq * nh + a) / (1 - c)) * _INFLATE + 2.0 ** -100


class _Buffers:
    """Score buffers reused across chunks (a fresh 8-64 MB block per chunk costs page faults)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, name: str = "") -> Tensor:
        key = (name, dtype, device)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < shape[0] * shape[1]:
            buf = self.bufs[key] = torch.empty(shape[0] * shape[1], dtype=dtype, device=device)
        return buf[:shape[0] * shape[1]].view(shape)

    def fp32(self, s: Tensor) -> Tensor:
        return self.get(tuple(s.shape), torch.float32, s.device).copy_(s)


def screen_product(a16: Tensor, b16: Tensor, buffers: _Buffers | None = None) -> tuple[Tensor, float]:
    """bf16 ``a16 @ b16.T`` with fp32 accumulation and the relative output rounding ``c`` of the
    bound. A CPU returns bf16 (torch has no fp32-output bf16 mm there: c = u/(1-u)); CUDA has
    ``mm(out_dtype=float32)`` (no output rounding, and no bf16 reduced-precision reduction)."""
    if a16.device.type == "cuda":
        try:
            return torch.mm(a16, b16.T, out_dtype=torch.float32), 0.0
        except (TypeError, RuntimeError):
            pass
    shape = (a16.shape[0], b16.shape[0])
    out = buffers.get(shape, torch.bfloat16, a16.device) if buffers is not None else None
    return torch.mm(a16, b16.T, out=out), U_BF16 / (1 - U_BF16)


_bf16_state: dict[str, bool] = {}


def bf16_product_is_fp32_accumulated(device: torch.device) -> bool:
    """Checked once per device type: the bf16 product accumulates in fp32 (the bound's model).
    4096 ones sum to 4096 in fp32; a bf16 accumulator stalls at 256."""
    key = device.type
    if key not in _bf16_state:
        try:
            ones = torch.ones(2, 4096, dtype=torch.bfloat16, device=device)
            s, _ = screen_product(ones, ones)
            gen = torch.Generator(device="cpu").manual_seed(0)
            a = torch.randn(8, 1024, generator=gen).to(device)
            b = torch.randn(16, 1024, generator=gen).to(device)
            a16, b16 = a.bfloat16(), b.bfloat16()
            got, c = screen_product(a16, b16)
            ref = a16.double() @ b16.double().T
            err = (got.double() - ref).abs()
            lim = _gamma(1024) * (a16.double().abs() @ b16.double().abs().T) + c / (1 - c) * got.double().abs()
            _bf16_state[key] = bool((s.float() == 4096).all()) and bool((err <= lim * _INFLATE + 1e-30).all())
        except RuntimeError:
            _bf16_state[key] = False
    return _bf16_state[key]


# ---- rescoring products: which small product reproduces the exact path's block bits ----------

def _onednn_rows(a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _onednn_cols(a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(b, a, None, "none", [], "").T


def _mm_rows(a: Tensor, b: Tensor) -> Tensor:
    return a @ b.T


def _mm_cols(a: Tensor, b: Tensor) -> Tensor:
    return (b @ a.T).T


_probe_cache: dict[tuple, dict] = {}


def _candidates(device: torch.device) -> list[ProductFn]:
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
    return ([_onednn_rows, _onednn_cols] if onednn else []) + [_mm_rows, _mm_cols]


@dataclass(frozen=True)
class Rescorer:
    """A product ``fn(a [M, d], b [n, d]) -> [M, n]`` that reproduces the exact path's block
    bits for M in ``sizes`` (query rows per call, the last group padded) and any n >= 2."""
    fn: ProductFn
    sizes: tuple[int, ...]


def _passing_sizes(block_product: ProductFn, rows: int, cols: int, d: int, device: torch.device) -> dict:
    """{candidate: group sizes M for which it reproduces a rows x cols block} (cached)."""
    key = (rows, cols, d, device.type, device.index, onednn_active())
    if key in _probe_cache:
        return _probe_cache[key]
    gen = torch.Generator(device="cpu").manual_seed(rows * 7919 + cols * 31 + d)
    A = torch.randn(rows, d, generator=gen).to(device)
    B = torch.randn(cols, d, generator=gen).to(device)
    B[: max(1, cols // 7)] *= 1e-3  # mixed magnitudes: a reordered sum would show
    ref = block_product(A, B)
    widths = sorted({2, 3, 5, 17, 64, 333, cols} & set(range(2, cols + 1))) or [2]
    out = {}
    for f in _candidates(device):
        ok = []
        for M in sorted(set(_GROUP_SIZES) | ({rows} if rows <= 16 else set())):
            M = max(M, 2)
            r = torch.randint(0, rows, (M,), generator=gen).to(device)
            try:
                if all(torch.equal(f(A[r], B[c]), ref[r][:, c]) for c in (
                        torch.randint(0, cols, (n,), generator=gen).to(device) if n != cols
                        else torch.arange(cols, device=device) for n in widths)):
                    ok.append(M)
            except RuntimeError:
                break
        out[f] = set(ok)
    _probe_cache[key] = out
    return out


def rescore_product(block_product: ProductFn, shapes: set[tuple[int, int]], d: int,
                    device: torch.device) -> Rescorer | None:
    """A :class:`Rescorer` whose every element equals, bitwise, the exact path's
    ``block_product`` at those rows and columns for every ``(rows, cols)`` block shape of the
    call; None if no candidate does (the call is then not screened).

    Checked once per (shape, device, GEMM library) on random fp32 data: gathered row / column
    subsets of several sizes, the whole chunk included, against the full block. oneDNN passes
    for any M >= 2 here; MKL's small products (the exact path's blocks under 2M multiply-adds
    or of <= 4 queries) only for the block's own query count, if at all."""
    best = None
    for f in _candidates(device):
        sizes = None
        for rows, cols in shapes:
            ok = _passing_sizes(block_product, rows, cols, d, device)[f]
            # a group never needs more rows than the block has (padded to >= 2)
            need = {m for m in ok if m <= max(2, rows) or m in _GROUP_SIZES}
            sizes = need if sizes is None else sizes & need
        if sizes and (best is None or max(sizes) > max(best.sizes)):
            best = Rescorer(f, tuple(sorted(sizes)))
    return best


# ---- the bound's terms -----------------------------------------------------------------------

def _norms64(t: Tensor) -> Tensor:
    """Row norms in float64 (exact to ~1e-16 for any finite fp32 row)."""
    x = t.double()
    big = x.abs().amax(1).clamp_min(1e-300)
    return torch.linalg.vector_norm(x / big[:, None], dim=1) * big * (1 + 2.0 ** -40)


def _max_norm(t: Tensor) -> float:
    """Largest row norm of an fp32 tensor, rounded up past its own error: relative (d + 8) u_acc
    for the fp32 sum of squares and the root; squares that underflow lose < d 2^-126 in total,
    so at most sqrt(d) 2^-63 of the norm. NaN / inf rows give NaN / inf."""
    if t.shape[0] == 0:
        return 0.0
    d = t.shape[1]
    return float(torch.linalg.vector_norm(t, dim=1).amax()) * (1 + (d + 8) * U_ACC) + math.sqrt(d) * 2.0 ** -62


@dataclass
class GalleryTerms:
    """Gallery maxima of the bound, over every chunk screened so far."""
    dh: float = 0.0   # max |h - h'|
    h: float = 0.0    # max |h|
    G: float = 0.0    # max |g| inv


def chunk_terms(gb: Tensor, inv_ng: Tensor | None, buffers: _Buffers | None = None) -> tuple[Tensor, GalleryTerms]:
    """The screened rows h' = bf16(fl32(g inv)) of an fp32 chunk and the chunk's bound terms.
    Raises NonFiniteScores for NaN / inf rows (or a row that overflows bf16). ``buffers``: reuse
    the chunk-sized temporaries (fresh 64 MB tensors cost page faults on every chunk)."""
    bufs = buffers or _Buffers()
    d, shape = gb.shape[1], tuple(gb.shape)
    h = torch.mul(gb, inv_ng[:, None], out=bufs.get(shape, gb.dtype, gb.device, "h")) if inv_ng is not None else gb
    h16 = bufs.get(shape, torch.bfloat16, gb.device, "h16").copy_(h)
    # |fl(g inv)| <= 1 + (d + 8) u_acc: inv comes from a norm good to ~(d/2 + 2) u32
    h_max = 1.0 + (d + 8) * U_ACC if inv_ng is not None else _max_norm(h)
    # NaN / inf rows (and bf16 overflow) show up in |h - h'|: the screened blocks need no
    # finiteness pass of their own
    dh_max = _max_norm(torch.sub(h, h16, out=bufs.get(shape, gb.dtype, gb.device, "dh")))
    if not (math.isfinite(dh_max) and math.isfinite(h_max)):
        raise NonFiniteScores()
    return h16, GalleryTerms(dh_max, h_max, h_max * (1 + 4 * U_FP32) if inv_ng is not None else h_max)


def screen_bound_terms(q: Tensor, q16: Tensor, gallery: GalleryTerms, d: int) -> Tensor:
    """``a`` per query [Q] (float64) of ``|S - E| <= a + c|S|`` (module docstring)."""
    dq = (q - q16.to(q.dtype))
    nq, nq16, ndq = _norms64(q), _norms64(q16), _norms64(dq)
    g = _gamma(d)
    a = (nq16 * gallery.dh + ndq * gallery.h + g * nq16 * (gallery.h + gallery.dh)
         + (2 * g + 3 * U_FP32) * nq * gallery.G)
    tau = (3 * d + 4) * 2.0 ** -124 * (1 + nq16 + gallery.h + gallery.dh)  # subnormals flushed
    return (a + tau + 2.0 ** -30 * nq * gallery.G) * _INFLATE  # + float64 evaluation slack


# ---- the search --------------------------------------------------------------------------------

def _selector(rows: int, k: int, device: torch.device):
    native = device.type == "cpu" and topk_select.cpu_select_available()
    return topk_select.CpuRunningTopk(rows, k) if native else topk_select.RunningTopk(k)


@dataclass
class _Block:
    q0: int
    q: Tensor            # fp32 query rows as the exact path uses them
    q16: Tensor
    sel: object          # running selector of screened scores (k_screen per query)
    product: Rescorer    # bitwise rescoring product
    c: float = 0.0
    ok: Tensor | None = None
    cand: Tensor | None = None  # [rows, m] gallery indices by ascending index, -1 pads
    exact: object | None = None  # fallback selector (exact scores, k per query) over failed rows
    failed: Tensor | None = None
    result: tuple[Tensor, Tensor] | None = None
    buffers: _Buffers = field(default_factory=_Buffers)


@dataclass
class ScreenedSearch:
    """bf16-screened exact top-k of query blocks over a gallery streamed in chunks.

    Use: ``add_chunk`` for every chunk (in gallery order), ``finish`` (candidates, the queries
    that need the exact pass), ``rescore`` (exact scores of the candidates), and, if
    ``needs_exact_pass``, ``exact_chunk`` for every chunk again, then ``results``.
    """
    k: int
    k_screen: int
    n_total: int      # gallery rows
    rankable: int     # rows a query can rank (n_total - 1 with exclude_self)
    normalize: bool
    exclude_self: bool
    blocks: list[_Block] = field(default_factory=list)
    gallery: GalleryTerms = field(default_factory=GalleryTerms)
    inv_all: Tensor | None = None
    d: int = 0
    buffers: _Buffers = field(default_factory=_Buffers)
    stats: dict = field(default_factory=lambda: {"screened": 0, "fallback": 0, "candidates": 0})

    def add_block(self, q0: int, q: Tensor, product: Rescorer) -> None:
        """Screen the fp32 query rows ``q`` (gallery indices of exclude_self: q0 + row)."""
        self.d = q.shape[1]
        if self.normalize and self.inv_all is None:
            self.inv_all = torch.empty(self.n_total, dtype=q.dtype, device=q.device)
        self.blocks.append(_Block(q0, q, q.to(torch.bfloat16), _selector(q.shape[0], self.k_screen, q.device), product))

    def add_chunk(self, gb: Tensor, inv_ng: Tensor | None, n0: int, block_rows: int | None = None) -> None:
        """Screen every block against gallery rows n0 .. n0 + len(gb) - 1 (fp32 ``gb``; ``inv_ng``
        the exact path's inverse norms when normalizing), ``block_rows`` rows per product (the
        conversion and the bound's reductions run once over the whole ``gb``: fewer parallel
        regions). Raises NonFiniteScores on NaN/inf."""
        h16, terms = chunk_terms(gb, inv_ng, self.buffers)
        if inv_ng is not None:
            self.inv_all[n0:n0 + gb.shape[0]] = inv_ng
        t = self.gallery
        t.dh, t.h, t.G = max(t.dh, terms.dh), max(t.h, terms.h), max(t.G, terms.G)
        step = block_rows or gb.shape[0]
        for j0 in range(0, gb.shape[0], step):
            part = h16[j0:j0 + step]
            for blk in self.blocks:
                s, blk.c = screen_product(blk.q16, part, blk.buffers)
                if isinstance(blk.sel, topk_select.CpuRunningTopk):
                    s = blk.buffers.fp32(s) if s.dtype != torch.float32 else s  # it reads fp32, keeps nothing
                else:
                    s = s.float()  # a fresh tensor (RunningTopk may keep it; buffers are reused)
                if self.exclude_self:
                    _exclude(s, blk.q0, n0 + j0)
                blk.sel.add(s, n0 + j0)

    def finish(self) -> None:
        """Per query: the kept window (module docstring) and whether it is complete."""
        for blk in self.blocks:
            vals, idx = blk.sel.flush()
            blk.sel = None
            v = vals.double()
            a = screen_bound_terms(blk.q, blk.q16, self.gallery, self.d) * _EPS_SCALE
            blk.c *= _EPS_SCALE
            if float(_norms64(blk.q).max()) * max(self.gallery.G, self.gallery.h + self.gallery.dh) > _HUGE:
                raise NonFiniteScores()  # the exact path decides (it may overflow or raise)
            T = v[:, self.k - 1]
            lam = T - blk.c * T.abs() - 2 * a
            upper = v + blk.c * v.abs()
            keep = upper >= lam[:, None]
            blk.ok = (upper[:, -1] < lam) if self.k_screen < self.rankable else torch.ones_like(keep[:, 0])
            blk.ok &= torch.isfinite(lam)
            m = int(keep.sum(1).max()) if keep.shape[0] else 0
            cand = torch.where(keep, idx, torch.full_like(idx, self.n_total))
            cand = cand.sort(dim=1).values[:, :max(m, 1)]
            blk.cand = torch.where(cand == self.n_total, torch.full_like(cand, -1), cand)
            blk.failed = (~blk.ok).nonzero()[:, 0]
            self.stats["screened"] += int(blk.ok.sum())
            self.stats["fallback"] += int(blk.failed.numel())
            self.stats["candidates"] += int(keep[blk.ok].sum())
        self.stats["gallery_dh"] = self.gallery.dh

    @property
    def needs_exact_pass(self) -> bool:
        return any(blk.failed.numel() > 0 for blk in self.blocks)

    def rescore(self, fetch: Callable[[Tensor], Tensor]) -> None:
        """Exact scores of the kept candidates of every complete query; ``fetch(indices)`` gives
        those gallery rows as the exact path's fp32 rows (on the queries' device)."""
        for blk in self.blocks:
            rows = blk.ok.nonzero()[:, 0]
            blk.result = _rescore(blk.q, blk.cand, rows, fetch, self.inv_all, blk.product, self.k) \
                if rows.numel() else None
            if blk.failed.numel():
                blk.exact = _selector(int(blk.failed.numel()), self.k, blk.q.device)

    def exact_chunk(self, gb: Tensor, n0: int) -> None:
        """The exact pass for the queries whose window overflowed: their exact block scores
        through the rescoring product (the exact path's bits), selected like the exact path."""
        for blk in self.blocks:
            if blk.exact is None:
                continue
            qf = blk.q[blk.failed]
            s = _product_rows(blk.product, qf, gb)
            if self.inv_all is not None:
                s *= self.inv_all[n0:n0 + gb.shape[0]]
            if not bool(torch.isfinite(s).all()):
                raise NonFiniteScores()
            if self.exclude_self:
                own = blk.q0 + blk.failed
                hit = (own >= n0) & (own < n0 + gb.shape[0])
                s[hit.nonzero()[:, 0], own[hit] - n0] = -math.inf
            blk.exact.add(s, n0)

    def results(self) -> list[tuple[int, Tensor, Tensor]]:
        """``(q0, scores [rows, k], indices [rows, k])`` per block, sorted like the exact path."""
        out = []
        for blk in self.blocks:
            n = blk.q.shape[0]
            s = torch.empty(n, self.k, dtype=blk.q.dtype, device=blk.q.device)
            i = torch.empty(n, self.k, dtype=torch.int64, device=blk.q.device)
            if blk.result is not None:
                rows = blk.ok.nonzero()[:, 0]
                s[rows], i[rows] = blk.result
            if blk.exact is not None:
                s[blk.failed], i[blk.failed] = blk.exact.flush()
            out.append((blk.q0, s, i))
        return out


def _exclude(s: Tensor, q0: int, n0: int) -> None:
    """Query q0 + r's own gallery row (exclude_self) at -inf in a [rows, chunk] block."""
    rows = torch.arange(q0, q0 + s.shape[0], device=s.device)
    own = (rows >= n0) & (rows < n0 + s.shape[1])
    s[own.nonzero()[:, 0], rows[own] - n0] = -math.inf


def _group_size(r: Rescorer, rows: int, width: int = 0) -> int:
    """Queries per rescoring product: the smallest checked size that holds ``rows`` queries,
    capped so that one call gathers ~8k gallery rows (``width`` per query)."""
    fit = [m for m in r.sizes if m >= rows]
    g = fit[0] if fit else r.sizes[-1]
    while width and g * width > 8192 and any(m < g for m in r.sizes):
        g = max(m for m in r.sizes if m < g)
    return g


def _call(r: Rescorer, q: Tensor, b: Tensor, g: int) -> Tensor:
    """``r.fn`` on ``g`` query rows (``q`` padded by repeating its first row; the extra results
    are dropped) and >= 2 gallery rows (a 1-column product takes a GEMV kernel: other bits)."""
    n = q.shape[0]
    if n < g:
        q = torch.cat([q, q[:1].expand(g - n, -1)])
    if b.shape[0] < 2:
        return r.fn(q.contiguous(), b.expand(2, -1))[:n, :1]
    return r.fn(q.contiguous(), b)[:n]


def _product_rows(r: Rescorer, q: Tensor, b: Tensor) -> Tensor:
    """The exact block scores of query rows ``q`` against gallery rows ``b`` through ``r``."""
    g = _group_size(r, q.shape[0])
    out = [_call(r, q[r0:r0 + g], b, g) for r0 in range(0, q.shape[0], g)]
    return torch.cat(out) if len(out) > 1 else out[0]


def _rescore(q: Tensor, cand: Tensor, rows: Tensor, fetch: Callable[[Tensor], Tensor], inv_all: Tensor | None,
             product: Rescorer, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of queries ``rows`` over their candidates ``cand`` (ascending, -1 pads)."""
    cand = cand[rows]
    m = cand.shape[1]
    # g queries per product: g*m gathered rows and g-fold redundant flops (a few % of the GEMM
    # time saved), but few calls: each small op is a barrier for the OpenMP workers
    g = _group_size(product, rows.shape[0], m)
    scores = torch.empty(cand.shape, dtype=q.dtype, device=q.device)
    valid = cand >= 0
    safe = torch.where(valid, cand, torch.zeros_like(cand))
    qs = q[rows]
    for r0 in range(0, rows.shape[0], g):
        sub = safe[r0:r0 + g]
        n = sub.shape[0]
        p = _call(product, qs[r0:r0 + g], fetch(sub.reshape(-1)), g)
        scores[r0:r0 + n] = torch.diagonal(p.reshape(n, n, m), dim1=0, dim2=1).T  # each query's own columns
    if inv_all is not None:
        scores *= inv_all[safe]  # the exact path's `s *= inv_ng`: one fp32 multiply
    if not bool(torch.isfinite(scores[valid]).all()):
        raise NonFiniteScores()
    scores.masked_fill_(~valid, -math.inf)
    s, col = topk_lowest_index_ties(scores, k)  # columns are in gallery-index order
    return s, cand.gather(1, col)
