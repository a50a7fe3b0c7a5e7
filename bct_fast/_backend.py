"""Lazy access to the native extension ``bct_fast._C``.

Importing bct_fast never loads or requires the extension; the first op that could use a CUDA
kernel asks :func:`native` for it. Machines without a GPU, without a CUDA driver, or with a
CPU-only build get the chunked PyTorch paths instead.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType
from typing import Any


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


def build_info() -> dict[str, Any]:
    """What this installation of bct_fast can do.

    Keys: ``version``, ``extension_loaded`` (and ``extension_error`` when not), ``cuda_compiled``,
    ``cuda_compiler_version``, ``cuda_architectures`` (compile time), and at run time
    ``driver_version``, ``runtime_version``, ``device_count`` (0, not an error, without a GPU or
    driver), ``torch_version``, ``torch_cuda_available``, ``cpu_gemm`` (``"onednn"`` or
    ``"torch.mm"``: what runs the fp32 CPU products of the chunked paths and of search).
    """
    from bct_fast import __version__

    mod, error = _load()
    info: dict[str, Any] = {"version": __version__, "extension_loaded": mod is not None}
    if mod is None:
        info.update(extension_error=error, cuda_compiled=False, cuda_compiler_version=None,
                    cuda_architectures=None, driver_version=0, runtime_version=0, device_count=0)
    else:
        info.update(mod.build_info())
        info.update(mod.runtime_info())
    try:
        import torch

        from bct_fast._cpu_gemm import onednn_active

        info["torch_version"] = torch.__version__
        info["torch_cuda_available"] = bool(torch.cuda.is_available())
        info["cpu_gemm"] = "onednn" if onednn_active() else "torch.mm"
    except ImportError:  # the extension itself never needs torch
        info["torch_version"] = None
        info["torch_cuda_available"] = False
        info["cpu_gemm"] = None
    return info


@functools.lru_cache(maxsize=None)
def warn_fallback(op: str) -> None:
    """Warn once per op that CUDA tensors are served by the chunked PyTorch path."""
    warnings.warn(
        f"bct_fast.{op}: CUDA tensors but bct_fast was built without CUDA kernels "
        f"({'extension not importable' if native() is None else 'CPU-only build'}); "
        "using the chunked PyTorch path. Rebuild with nvcc available for the fused kernels.",
        RuntimeWarning,
        stacklevel=3,
    )
