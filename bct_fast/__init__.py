"""bct_fast: CUDA-accelerated backward-compatible training (BCT) and large-gallery retrieval.

Submodules load lazily so that ``import bct_fast`` is cheap and never fails on a CPU machine:

- :mod:`bct_fast.ops`: the fused ops (``cosine_margin_cross_entropy``) as autograd-aware functions
- :mod:`bct_fast.losses`: drop-in loss modules (NormSoftmax, CosFace, ArcFace, Influence, BCT)
- :mod:`bct_fast.search`: exact top-k cosine search (``cosine_topk``, ``GalleryIndex``, ``KnnFunc``)
- :mod:`bct_fast.metrics`: retrieval / verification metrics from top-k results
- :mod:`bct_fast.evaluate`: cross-test, compatibility criterion, compatibility matrices
- :func:`build_info`: what this installation was built with and can run
"""
from __future__ import annotations

import importlib
from typing import Any

from bct_fast._backend import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "__version__", "ops", "losses", "cosine_margin_cross_entropy"]

_SUBMODULES = {"ops", "losses", "margins", "search", "gallery", "metrics", "evaluate", "cli"}
_LAZY_ATTRS = {"cosine_margin_cross_entropy": "ops"}


def __getattr__(name: str) -> Any:  # PEP 562 lazy loading
    if name in _SUBMODULES:
        return importlib.import_module(f"bct_fast.{name}")
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(f"bct_fast.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'bct_fast' has no attribute {name!r}")
