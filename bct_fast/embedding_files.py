"""Reading users' embedding and label files: ``.npy`` (optionally memory-mapped) and
``.safetensors``, with errors that name the option or argument and the file."""
from __future__ import annotations

import os

import numpy as np

from bct_fast._core.arrays import host_tensor

__all__ = ["load_array"]


def load_array(path: str | os.PathLike, what: str, *, mmap: bool = False):
    """The array in ``path``: a torch tensor, or with ``mmap`` and a float32/16/64 ``.npy`` file a
    read-only numpy memmap (searched by chunks, never loaded whole). ``.safetensors``: the tensor
    named ``embeddings`` (or ``labels``), else the first one. ``what`` names the source in errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {'is a directory' if os.path.isdir(path) else 'file not found'}: {path}")
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, OSError, EOFError) as e:  # empty, truncated, pickled or foreign files
            raise ValueError(f"{what}: not a readable .npy file: {path} ({type(e).__name__}: {e})") from None
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{what}: {path} holds {a.dtype} data, expected numbers")
        if mmap and a.ndim == 2 and a.dtype.kind == "f" and a.dtype.isnative and a.dtype.itemsize in (2, 4, 8):
            return a
        return host_tensor(a)  # any byte order
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{what}: reading .safetensors needs `pip install safetensors`") from None
        try:
            tensors = load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{what}: not a readable .safetensors file: {path} ({type(e).__name__}: {e})") from None
        if not tensors:
            raise ValueError(f"{what}: {path} holds no tensors")
        return tensors.get("embeddings", tensors.get("labels", next(iter(tensors.values()))))
    raise ValueError(f"{what}: expected a .npy or .safetensors file, got {path}")
