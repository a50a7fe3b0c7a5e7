"""Calling conventions shared by the CUDA providers: dtype codes, the caller's stream.

The Python side owns all memory: outputs and workspaces are torch tensors allocated on the
caller's device and stream, so the caching allocator, streams and CUDA graphs behave as usual;
``bct_fast._C`` gets raw pointers, sizes, a dtype code and the stream.
"""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the integer handle the launchers take."""
    return torch.cuda.current_stream(t.device).cuda_stream


def f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy (or view) of a per-row vector."""
    return t.to(torch.float32).contiguous()
