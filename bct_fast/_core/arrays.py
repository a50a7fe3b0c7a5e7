"""numpy arrays and DLPack producers (cupy, JAX, ...) as torch tensors: the conversions every
entry point uses."""
from __future__ import annotations

import numpy as np
import torch


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor with ``a``'s values. A view when torch can share the memory; a copy for
    read-only arrays (memmaps opened "r") and non-native byte orders (big-endian .npy files),
    which torch refuses."""
    if not a.dtype.isnative:
        return torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
    return torch.from_numpy(np.ascontiguousarray(a) if a.flags.writeable else np.array(a))


def dlpack_view(x: object, name: str) -> object:
    """A tensor viewing ``x`` (no copy) when ``x`` is a DLPack producer other than a torch tensor
    or a numpy array (cupy, JAX, ...); anything else unchanged. numpy arrays keep their own
    path (memmaps are read by chunks, never wrapped whole)."""
    if isinstance(x, (torch.Tensor, np.ndarray)) or not hasattr(x, "__dlpack__"):
        return x
    try:
        return torch.from_dlpack(x)
    except (RuntimeError, TypeError, BufferError) as e:
        raise TypeError(f"{name}: a DLPack object torch cannot import ({type(x).__name__}: {e})") from None


def input_tensor(x: object, name: str) -> object:
    """An input (embeddings, labels, ids) as a tensor: numpy arrays through :func:`host_tensor`
    (any byte order), DLPack producers viewed (:func:`dlpack_view`); anything else unchanged
    (the caller's check names what is wrong)."""
    if isinstance(x, np.ndarray):
        return host_tensor(x)
    return dlpack_view(x, name)
