"""numpy arrays as torch tensors, the one conversion every entry point uses."""
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
