"""Autocast stays outside the library's ops.

Under ``torch.autocast`` PyTorch rewrites matmuls to fp16 / bf16 outputs. The ops here define
their own precision (fp32 logits and scores, float64 statistics; their docstrings say which), so
a training or evaluation loop that calls them inside an autocast region must get the same
results as outside it: the margin loss lost ~1 % of its gradients' accuracy there, and the CPU
search refused its own bf16 score blocks.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """A region where autocast is off for every device type it was on for (a no-op otherwise)."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def without_autocast(fn: F) -> F:
    """Decorator: ``fn`` runs in :func:`autocast_off`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
