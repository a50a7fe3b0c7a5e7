"""bct_fast: CUDA-accelerated backward-compatible training (BCT) and large-gallery retrieval.

Submodules load lazily so that ``import bct_fast`` is cheap and never fails on a CPU machine:

- :mod:`bct_fast.ops`: the op layer (``cosine_margin_cross_entropy``, ``cosine_topk``), each op
  with a chunked PyTorch provider, a CUDA provider and a float64 reference
- :mod:`bct_fast.losses`: drop-in loss modules (NormSoftmax, CosFace, ArcFace, Influence, BCT)
- :mod:`bct_fast.search`: exact top-k cosine search (``cosine_topk``, ``GalleryIndex``, ``KnnFunc``)
- :mod:`bct_fast.metrics`: retrieval / verification metrics from top-k results
- :mod:`bct_fast.evaluate`: cross-test, compatibility criterion, compatibility matrices
- :func:`build_info`: what this installation was built with and can run
"""
from __future__ import annotations

import importlib
from typing import Any

from bct_fast._core.extension import extension_info
from bct_fast._version import __version__

__all__ = ["build_info", "__version__", "ops", "losses", "cosine_margin_cross_entropy"]

_SUBMODULES = {"ops", "losses", "margins", "search", "gallery", "metrics", "evaluate", "train",
               "distributed", "data", "testing", "demo", "cli"}
_LAZY_ATTRS = {"cosine_margin_cross_entropy": "ops"}


def build_info() -> dict[str, Any]:
    """What this installation of bct_fast can do.

    Keys: ``version``, ``extension_loaded`` (and ``extension_error`` when not), ``cuda_compiled``,
    ``cuda_compiler_version``, ``cuda_architectures`` (as compiled: explicit architectures,
    never ``native``), ``kernel_sources`` (sha256 of each kernel family's sources), ``kernels``
    (per family: ``compiled``, ``verified_on_gpu``, ``record``, ``reason``: CUDA kernels run by
    default only once verified, see :mod:`bct_fast.ops.providers`), and at run time
    ``driver_version``, ``runtime_version``, ``device_count`` (0, not an error, without a GPU or
    driver), ``torch_version``, ``torch_cuda_available``, ``cpu_gemm`` (``"onednn"`` or
    ``"torch.mm"``: what runs the fp32 CPU products of the chunked paths and of search),
    ``unverified_kernels_requested`` (``BCT_FAST_UNVERIFIED_KERNELS=1``).
    """
    import os

    info = extension_info()
    info["unverified_kernels_requested"] = os.environ.get("BCT_FAST_UNVERIFIED_KERNELS") == "1"
    try:
        import torch
    except ImportError:  # the extension itself never needs torch
        info.update(torch_version=None, torch_cuda_available=False, cpu_gemm=None)
        return info
    from bct_fast.ops.cpu_gemm import onednn_active

    info.update(torch_version=torch.__version__, torch_cuda_available=bool(torch.cuda.is_available()),
                cpu_gemm="onednn" if onednn_active() else "torch.mm")
    return info


def __getattr__(name: str) -> Any:  # PEP 562 lazy loading
    if name in _SUBMODULES:
        return importlib.import_module(f"bct_fast.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"bct_fast.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'bct_fast' has no attribute {name!r}")
