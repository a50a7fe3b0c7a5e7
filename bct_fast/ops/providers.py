"""Which implementation serves an op: the provider contract and the one place that picks.

Every op family has a ``torch`` provider (chunked PyTorch: any device, bounded memory, verified
against the float64 references) and a ``cuda`` provider (the kernels of ``bct_fast._C``). A
provider module gives:

- margin softmax (``margin_softmax_torch`` / ``margin_softmax_cuda``):
  ``softmax_stats(x, w, inv_nx, inv_nw, labels, scale, with_pws)`` and
  ``softmax_grads(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, need_x,
  need_w)``, same contract (csrc/include/bct_fast/margin_softmax.h);
- cosine top-k (``topk_select`` / ``topk_cuda``): the exact top-k of a query block over one
  gallery chunk, merged by a running top-k with the same tie rule (lower index first);
- and, for the CUDA provider, ``unsupported(...) -> Unsupported | None``: why it cannot serve an
  input (dtype, k above its limit, ...).

Margin softmax has a third provider, ``epilogue`` (``margin_softmax_epilogue``): cuBLAS GEMMs
through ``torch.mm`` on class chunks and our kernels for everything after each GEMM (kernel
family ``margin_epilogue``, its own entry in ``gpu_verified.json``); so does cosine top-k
(``topk_epilogue``: ``torch.mm`` score blocks and our selection kernel, family ``topk_epilogue``).

:func:`choose` is the only place that decides. ``backend="auto"`` runs a family's CUDA kernels
only when the installed build's sources passed a recorded GPU run (``gpu_verified.json``) or
when ``BCT_FAST_UNVERIFIED_KERNELS=1``; ``backend="cuda"`` requests them (an error when they
cannot serve the call); ``backend="torch"`` never uses them. ``backend="epilogue"`` requests
the epilogue provider: on CUDA tensors its kernels (an error when they cannot serve the call),
on CPU tensors the same chunk loop with the PyTorch twin of the kernels (a test and debugging
route). Under ``"auto"`` the epilogue provider is picked only once its own family passed a
recorded GPU run (then before the SIMT kernels); ``BCT_FAST_UNVERIFIED_KERNELS=1`` does not
select it. Margin softmax also has a ``fused`` provider (``margin_softmax_fused``, family
``margin_fused``: tensor-core tiles with the forward statistics in registers; the sweeps it does
not fuse go to the epilogue provider). ``backend="fused"`` requests it (CUDA bf16 tensors only, an
error otherwise). So does cosine top-k (``topk_fused``, family ``topk_fused``: tensor-core score
tiles with the selection in shared memory; bf16 queries and gallery, k <= 128). Under ``"auto"``
the verified tensor-core providers come first, in the order of :func:`auto_order` (the faster
first on the measured GPU rows), then the verified SIMT kernels, except where those were measured
slower than the torch path (``SIMT_SLOWER_THAN_TORCH``: both families on the H200).
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from bct_fast._core.checks import check_choice
from bct_fast._core.extension import (build_runs_on, built_architectures, cuda_kernels_compiled,
                                     kernel_verification)

BACKENDS = ("auto", "torch", "cuda", "epilogue", "fused")
# Family of the fused provider of an op family that has one.
FUSED_FAMILIES = {"margin_softmax": "margin_fused", "cosine_topk": "topk_fused"}
# Family of the epilogue provider of an op family that has one.
EPILOGUE_FAMILIES = {"margin_softmax": "margin_epilogue", "cosine_topk": "topk_epilogue"}
# The order in which `auto` tries an op family's verified tensor-core providers: the faster first
# on the GPU measurements (H200, benchmarks/results/gpu_2026-11-26_h200.md and
# gpu_2026-11-26b_h200.md). Margin: fused before epilogue on every bf16 row (forward 6.7-6.9 vs
# 10.0-12.1 ms at C = 1M; ties only at d = 1024 forward, 3.0 vs 2.9 ms). Search: epilogue before
# fused from Q = 1000 up (6.2 vs 9.9 ms .. 588 vs 1106 ms) ...
AUTO_ORDER = {"margin_softmax": ("fused", "epilogue"), "cosine_topk": ("epilogue", "fused")}
# ... but fused first for batches of at most one fused query tile (128 rows): at Q = 1 it took
# 1.5 ms vs 4.5 ms (N = 1M) and 10.6 ms vs 39.2 ms (N = 10M), and up to 128 queries its tile
# work is the same (rows beyond Q are padding). Only Q = 1 and Q >= 1000 were measured.
SMALL_BATCH_ORDER = {"cosine_topk": (128, ("fused", "epilogue"))}
# Op families whose SIMT kernels `auto` leaves alone even once verified: measured slower than the
# chunked torch path on every row (same runs).
SIMT_SLOWER_THAN_TORCH = {
    "margin_softmax": "H200, B = 1024, C = 1M, d = 512, bf16: 140 ms vs 25 ms forward, 1010 ms vs "
                      "73 ms forward + backward",
    "cosine_topk": "H200, bf16, 10 shapes from Q = 1 to 1000, N = 1M to 10M, k = 10 to 4096: "
                   "1.2-11x slower, e.g. 287 ms vs 109 ms at Q = 1000, N = 1M, k = 10"}
UNVERIFIED_ENV = "BCT_FAST_UNVERIFIED_KERNELS"


@dataclass(frozen=True)
class Unsupported:
    """Why a CUDA provider cannot serve an input; ``expected``: a deliberate route (float64
    stays on the exact torch path), not worth a warning."""

    reason: str
    expected: bool = False


@dataclass(frozen=True)
class Choice:
    provider: str  # "torch" | "cuda" | "epilogue" | "fused"
    reason: str
    warn: bool = False  # CUDA tensors on the torch path for a reason the user may not expect


@functools.lru_cache(maxsize=None)
def _verified(family: str) -> bool:
    return bool(kernel_verification()[family]["verified_on_gpu"])


def _no_code_for(device: torch.device) -> Unsupported | None:
    """Why this build cannot run on ``device`` (no cubin or PTX for its architecture), or None
    (also when the build does not say what it was built for)."""
    if not built_architectures() or not torch.cuda.is_available():
        return None  # no list to check, or no GPU to ask (a test's stand-in device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _no_code_for_index(index)


@functools.lru_cache(maxsize=None)
def _no_code_for_index(index: int) -> Unsupported | None:
    major, minor = torch.cuda.get_device_capability(index)
    if build_runs_on((major, minor)) is False:
        return Unsupported(f"bct_fast was built for CUDA architectures {built_architectures()}, none "
                           f"of which runs on this sm_{major}{minor} GPU (rebuild with "
                           f"CUDAARCHS={major}{minor}-real)")
    return None


def _cuda_build_unsupported(device: torch.device) -> Unsupported | None:
    """Why no CUDA kernel of this build can serve tensors on ``device``, or None."""
    if not cuda_kernels_compiled():
        return Unsupported("bct_fast was built without CUDA kernels (CPU-only build or extension "
                           "not importable)")
    return _no_code_for(device)


def check_backend(backend: object) -> str:
    check_choice(backend, "backend", BACKENDS)
    return backend  # type: ignore[return-value]


def _choose_epilogue(family: str, device: torch.device,
                     epilogue_unsupported: Callable[[], Unsupported | None] | None) -> Choice:
    """backend='epilogue': the epilogue provider, or a ValueError saying why it cannot serve."""
    if epilogue_unsupported is None or family not in EPILOGUE_FAMILIES:
        raise ValueError(f"backend: 'epilogue' is not available for {family}")
    why = epilogue_unsupported()
    if why is not None:
        raise ValueError(f"backend: the epilogue provider of {family} cannot serve this call: {why.reason}")
    if device.type == "cuda":
        build = _cuda_build_unsupported(device)
        if build is not None:
            raise ValueError(f"backend: 'epilogue' needs the CUDA kernels: {build.reason}")
        return Choice("epilogue", "backend='epilogue' requested")
    return Choice("epilogue", f"backend='epilogue' on {device.type} tensors: the chunk loop with "
                              f"the PyTorch twin of the epilogue kernels")


def _choose_fused(family: str, device: torch.device,
                  fused_unsupported: Callable[[], Unsupported | None] | None) -> Choice:
    """backend='fused': the fused provider, or a ValueError saying why it cannot serve."""
    if fused_unsupported is None or family not in FUSED_FAMILIES:
        raise ValueError(f"backend: 'fused' is not available for {family}")
    if device.type != "cuda":
        raise ValueError(f"backend: 'fused' needs CUDA tensors, got tensors on {device} (the fused "
                         f"kernels have no CPU twin; backend='epilogue' has one)")
    build = _cuda_build_unsupported(device)
    if build is not None:
        raise ValueError(f"backend: 'fused' needs the CUDA kernels: {build.reason}")
    why = fused_unsupported()
    if why is not None:
        raise ValueError(f"backend: the fused provider of {family} cannot serve this call: {why.reason}")
    return Choice("fused", "backend='fused' requested")


def auto_order(family: str, rows: int | None = None) -> tuple[str, ...]:
    """The order in which ``auto`` tries ``family``'s verified tensor-core providers for a call
    with ``rows`` queries (None: unknown)."""
    small = SMALL_BATCH_ORDER.get(family)
    if small is not None and rows is not None and rows <= small[0]:
        return small[1]
    return AUTO_ORDER.get(family, ())


def choose(family: str, device: torch.device, backend: str,
           unsupported: Callable[[], Unsupported | None],
           epilogue_unsupported: Callable[[], Unsupported | None] | None = None,
           fused_unsupported: Callable[[], Unsupported | None] | None = None,
           rows: int | None = None) -> Choice:
    """The provider of ``family`` (``"margin_softmax"`` | ``"cosine_topk"``) for tensors on
    ``device``; ``unsupported`` is asked only when the CUDA kernels are compiled.
    ``epilogue_unsupported`` / ``fused_unsupported``: the same question for the family's
    epilogue / fused provider (None: the family has none). ``rows``: the call's query rows
    (see :func:`auto_order`)."""
    check_backend(backend)
    if backend == "torch":
        return Choice("torch", "backend='torch' requested")
    if backend == "epilogue":
        return _choose_epilogue(family, device, epilogue_unsupported)
    if backend == "fused":
        return _choose_fused(family, device, fused_unsupported)
    if device.type != "cuda":
        if backend == "cuda":
            raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
        return Choice("torch", f"{device.type} tensors")
    build = _cuda_build_unsupported(device)
    if build is not None:
        if backend == "cuda":
            raise ValueError(f"backend: the CUDA kernels of {family} cannot serve this call: {build.reason}")
        return Choice("torch", build.reason, warn=True)
    if backend == "cuda":
        why = unsupported()
        if why is not None:
            raise ValueError(f"backend: the CUDA kernels of {family} cannot serve this call: {why.reason}")
        return Choice("cuda", "backend='cuda' requested")
    # auto: the verified tensor-core providers first (each asked only whether it can serve), then
    # the SIMT kernels, whose own limits (k, dtypes, shared memory) bind only them.
    candidates = {"fused": (FUSED_FAMILIES, fused_unsupported),
                  "epilogue": (EPILOGUE_FAMILIES, epilogue_unsupported)}
    for provider in auto_order(family, rows):
        families, unsupported_fn = candidates[provider]
        if unsupported_fn is not None and _verified(families[family]) and unsupported_fn() is None:
            return Choice(provider, f"its {provider} kernels passed a recorded GPU run")
    why = unsupported()
    if why is not None:
        return Choice("torch", why.reason, warn=not why.expected)
    if _verified(family):
        if family in SIMT_SLOWER_THAN_TORCH:
            return Choice("torch", f"its SIMT kernels passed a recorded GPU run but were slower than "
                                   f"this path there ({SIMT_SLOWER_THAN_TORCH[family]}); "
                                   f"backend='cuda' runs them")
        return Choice("cuda", "its sources passed a recorded GPU run")
    if os.environ.get(UNVERIFIED_ENV) == "1":
        return Choice("cuda", f"{UNVERIFIED_ENV}=1")
    return Choice("torch", f"its CUDA kernels have not passed a recorded GPU run yet (set "
                           f"{UNVERIFIED_ENV}=1 or backend='cuda' to run them)", warn=True)


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, reason: str) -> None:
    warnings.warn(f"bct_fast.{op}: CUDA tensors served by the chunked PyTorch path: {reason}.",
                  RuntimeWarning, stacklevel=4)


def note_fallback(op: str, choice: Choice) -> None:
    """Warn once per op and reason when CUDA tensors take the torch path unexpectedly."""
    if choice.warn:
        _warn_once(op, choice.reason)
