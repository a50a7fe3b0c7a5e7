"""Lazy access to the native extension ``bct_fast._C``, and what it was built from.

Importing bct_fast never loads or requires the extension; the first op that could use it asks
:func:`native` for it. Machines without a GPU, without a CUDA driver, or with a CPU-only build get
the chunked PyTorch paths instead. Nothing here needs torch.

Which CUDA kernels run by default is decided by evidence, not by their presence: the build
embeds a sha256 of the sources of each kernel family (``kernel_sources``); a family runs by
default only when that hash is listed in ``gpu_verified.json``, the record of a GPU run whose
tests (and sanitizer, where the machine allows it) passed. See :func:`kernel_verification`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from bct_fast._version import __version__

# Kernel family -> the source files (globs, relative to the repository root) its hash covers.
# CMakeLists.txt computes the same hash at configure time (keep the two lists identical).
KERNEL_SOURCES: dict[str, tuple[str, ...]] = {
    "margin_softmax": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                       "csrc/include/bct_fast/margin_softmax.h", "csrc/cuda/tile_common*",
                       "csrc/cuda/launch_common*", "csrc/cuda/margin_softmax*"),
    # The epilogue provider (cuBLAS GEMMs via torch.mm + these kernels): its own record, so
    # verifying one margin provider on a GPU never makes the other the default.
    "margin_epilogue": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                        "csrc/include/bct_fast/margin_epilogue.h", "csrc/cuda/tile_common*",
                        "csrc/cuda/launch_common*", "csrc/cuda/margin_epilogue*"),
    # The fused provider (tensor-core GEMM tiles with the statistics in registers).
    "margin_fused": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                     "csrc/include/bct_fast/margin_fused.h", "csrc/cuda/tile_common*",
                     "csrc/cuda/launch_common*", "csrc/cuda/mma_common*", "csrc/cuda/margin_fused*"),
    "cosine_topk": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                    "csrc/include/bct_fast/cosine_topk.h", "csrc/cuda/tile_common*",
                    "csrc/cuda/launch_common*", "csrc/cuda/cosine_topk*"),
    # The top-k epilogue provider (cuBLAS GEMMs via torch.mm + the selection kernel).
    "topk_epilogue": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                      "csrc/include/bct_fast/topk_epilogue.h", "csrc/cuda/tile_common*",
                      "csrc/cuda/launch_common*", "csrc/cuda/topk_order*", "csrc/cuda/topk_epilogue*"),
    # The fused top-k search (tensor-core score tiles, the selection in shared memory).
    "topk_fused": ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h",
                   "csrc/include/bct_fast/topk_fused.h", "csrc/cuda/tile_common*",
                   "csrc/cuda/launch_common*", "csrc/cuda/mma_common*", "csrc/cuda/topk_order*",
                   "csrc/cuda/topk_fused*"),
}
_VERIFIED_RECORD = Path(__file__).with_name("gpu_verified.json")
# Where each family's kernel bodies run on the CPU under the emulator shim (csrc/emulator/): the
# logic (tails, indices, ties, barriers, shared-memory races) is checked in CI; timing, memory
# ordering beyond the interleavings tried and tensor-core instructions are not. Emulation never
# makes a family the default: only a recorded GPU run does.
EMULATED_BY = {family: "tests/ops/test_kernels_emulated.py" for family in KERNEL_SOURCES}
EMULATED_BY["margin_epilogue"] = "tests/ops/test_epilogue_emulated.py"
EMULATED_BY["topk_epilogue"] = "tests/ops/test_topk_epilogue_emulated.py"
# mma.sync / ldmatrix are emulated from the PTX ISA's documented fragment layouts (not checked
# against hardware until a GPU run: margin_fused_mma_tile_check does that).
EMULATED_BY["margin_fused"] = "tests/ops/test_fused_emulated.py"
EMULATED_BY["topk_fused"] = "tests/ops/test_topk_fused_emulated.py"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("bct_fast._C"), ""
    except ImportError as exc:  # a source checkout that was never built, or a broken build
        return None, f"{type(exc).__name__}: {exc}"


def native() -> ModuleType | None:
    """The compiled extension, or None when it cannot be imported."""
    return _load()[0]


@functools.lru_cache(maxsize=None)
def cuda_kernels_compiled() -> bool:
    """True when the extension was built with its CUDA kernels."""
    mod = native()
    return bool(mod is not None and mod.build_info()["cuda_compiled"])


@functools.lru_cache(maxsize=None)
def built_architectures() -> str | None:
    """The CUDA architectures the extension was compiled for (CMake's list, comma-separated), or
    None without CUDA kernels. Cached: ``providers.choose`` asks on every CUDA call."""
    mod = native()
    info = mod.build_info() if mod is not None else {}
    return (info.get("cuda_architectures") or None) if info.get("cuda_compiled") else None


def build_runs_on(capability: tuple[int, int]) -> bool | None:
    """Whether the extension's CUDA code can run on a GPU of ``capability`` (major, minor): a
    cubin of the same major and a minor not above it, or PTX of an architecture not above it
    (``a``-suffixed architectures only on their own, ``f``-suffixed PTX within its major). None when the build does not say (no CUDA
    kernels, or an architecture list such as ``all`` that this cannot read)."""
    archs = built_architectures()
    if not archs:
        return None
    major, minor = capability
    for entry in str(archs).replace(";", ",").split(","):
        m = re.fullmatch(r"(\d+?)(\d)(a|f)?(?:-(real|virtual))?", entry.strip())
        if m is None:
            return None
        x, y, suffix, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if suffix == "a" and (x, y) != (major, minor):
            continue  # arch-specific: its own GPU only
        if kind in (None, "real") and x == major and y <= minor:
            return True
        # PTX: any newer GPU, but family-specific ("f") PTX only within its own major
        if kind in (None, "virtual") and (x, y) <= (major, minor) and (suffix != "f" or x == major):
            return True
    return False


def source_hashes(root: str | Path) -> dict[str, str]:
    """sha256 per kernel family of the source files under ``root`` (a checkout), computed as
    CMakeLists.txt does: over sorted ``"<relative path>:<file sha256>\\n"`` lines."""
    root = Path(root)
    out = {}
    for family, patterns in KERNEL_SOURCES.items():
        files = sorted({p.relative_to(root).as_posix() for pat in patterns for p in root.glob(pat) if p.is_file()})
        lines = "".join(f"{rel}:{hashlib.sha256((root / rel).read_bytes()).hexdigest()}\n" for rel in files)
        out[family] = hashlib.sha256(lines.encode()).hexdigest()
    return out


def built_source_hashes() -> dict[str, str]:
    """The per-family source hashes the installed extension was compiled from ({} without it)."""
    mod = native()
    return dict(mod.build_info().get("kernel_sources", {})) if mod is not None else {}


def verified_record() -> dict[str, Any]:
    """The committed record of GPU runs: ``{family: [{"sha256", "result", "device"}, ...]}``."""
    try:
        return json.loads(_VERIFIED_RECORD.read_text())
    except FileNotFoundError:
        return {}


def kernel_verification() -> dict[str, dict[str, Any]]:
    """Per kernel family: ``compiled``, ``verified_on_gpu`` (this build's sources are in the
    record of a passing GPU run), ``record`` (that run's result file), ``emulated_by`` (the CI
    test that runs its kernel logic on the CPU) and ``reason``."""
    built = built_source_hashes() if cuda_kernels_compiled() else {}
    record = verified_record()
    out = {}
    for family in KERNEL_SOURCES:
        h = built.get(family)
        runs = [r for r in record.get(family, []) if r.get("sha256") == h] if h else []
        if not h:
            reason = "not compiled (CPU-only build or extension not importable)"
        elif runs:
            reason = f"passed a recorded GPU run ({runs[0].get('result')})"
        else:
            reason = "compiled, but these sources have never passed a recorded GPU run"
        out[family] = {"compiled": bool(h), "verified_on_gpu": bool(runs),
                       "record": runs[0].get("result") if runs else None,
                       "emulated_by": EMULATED_BY[family], "reason": reason}
    return out


def extension_info() -> dict[str, Any]:
    """What the extension was built with and sees at run time (no torch involved)."""
    mod, error = _load()
    info: dict[str, Any] = {"version": __version__, "extension_loaded": mod is not None}
    if mod is None:
        info.update(extension_error=error, cuda_compiled=False, cuda_compiler_version=None,
                    cuda_architectures=None, driver_version=0, runtime_version=0, device_count=0)
    else:
        info.update(mod.build_info())
        info.update(mod.runtime_info())
    info["kernels"] = kernel_verification()
    return info
