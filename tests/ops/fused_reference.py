"""Inputs and float64 references shared by the fused margin kernels' emulator tests
(test_fused_emulated.py: lse; test_fused_pws_emulated.py: lse + pws)."""
from __future__ import annotations

import numpy as np

import kernel_emulator as emu

F32, F64 = np.float32, np.float64


def bf16(rng, shape):
    """(bf16 bits for the kernel, their exact values as float64)."""
    bits, val = emu.encode(rng.standard_normal(shape).astype(F32), "bfloat16")
    return bits, val.astype(F64)


def fused_inputs(rng, B, C, d, scale):
    """The launcher's arrays for bf16 x [B, d], w [C, d] (fp32 inverse norms, a quarter of the
    labels -1) and the exact values of x and w (float64)."""
    x_bits, x = bf16(rng, (B, d))
    w_bits, w = bf16(rng, (C, d))
    with np.errstate(divide="ignore"):  # d = 0 in the bad-argument tests
        inv_nx = (1 / np.linalg.norm(x, axis=1)).astype(F32)
        inv_nw = (1 / np.linalg.norm(w, axis=1)).astype(F32)
    labels = rng.integers(0, C, B).astype(np.int64)
    labels[rng.random(B) < 0.25] = -1
    arrays = dict(x=x_bits, w=w_bits, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels)
    return arrays, x, w


def logits64(a, x, w, scale):
    """float64 logits of the launcher's arrays: scale * cos, each row's target column left out
    (-inf), as the kernels do (the caller combines them with the margin logit)."""
    z = scale * (x @ w.T) * a["inv_nx"].astype(F64)[:, None] * a["inv_nw"].astype(F64)[None, :]
    rows = np.nonzero(a["labels"] >= 0)[0]
    z[rows, a["labels"][rows]] = -np.inf
    return z
