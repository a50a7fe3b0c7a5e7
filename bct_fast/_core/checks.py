"""Argument validation shared by the ops: clear exceptions that name the offending argument."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_matrix(t: object, name: str, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A 2-D tensor with at least one row and column, of an accepted floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [rows, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: must not be empty, got shape {tuple(t.shape)}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (expected one of {[str(d) for d in dtypes]})")
    return t


def check_labels(labels: object, name: str, rows: int | None, device: torch.device | None) -> torch.Tensor:
    """A 1-D integer tensor of length ``rows`` (None: any) on ``device`` (None: any). Float or
    bool labels are refused: equality on them would silently decide which items match."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or (rows is not None and labels.shape[0] != rows):
        raise ValueError(f"{name}: expected shape [{'N' if rows is None else rows}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {labels.dtype}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name}: on {labels.device}, but the embeddings are on {device}")
    return labels


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{b_name}: on {b.device}, but {a_name} is on {a.device}")


def check_choice(value: object, name: str, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def nonfinite_error(tensors: dict[str, torch.Tensor]) -> ValueError:
    """Name the first input that holds NaN/inf (called only once a result came out non-finite)."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[:5, 0].tolist()
            return ValueError(f"{name}: contains NaN or inf (rows {rows}{'...' if len(rows) == 5 else ''})")
    return ValueError("the result is not finite although every input is (overflow?)")


def check_device(device: object, name: str = "device") -> torch.device:
    """``torch.device(device)``, with an error that names the argument."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: not a torch device ({device!r}): {e}") from None


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or numpy, not bool) within [minimum, maximum], returned as ``int``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def embedding_output(out: object, name: str) -> torch.Tensor:
    """The embeddings a model returned: the tensor itself, or the first element of a
    (embedding, logits, ...) tuple / list, as a 2-D tensor [batch, dim]."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}: expected it to return embeddings [batch, dim] (or a tuple whose "
                         f"first element is), got {shape}")
    return out


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module lives: its first parameter's (or buffer's) device; a module with neither
    lives on the CPU."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (CUDA: free device memory plus torch's
    cached unused blocks; CPU: the kernel's MemAvailable), or None where it cannot be read."""
    try:
        if device.type == "cuda":  # free on the device + what torch's cache holds unused
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def check_fits(nbytes: int, name: str, what: str, device: torch.device) -> None:
    """ValueError naming ``name`` when ``nbytes`` for ``what`` exceed the memory left on
    ``device``: a clear error instead of an allocator failure or, on a Linux host that
    overcommits, the process killed while the buffer is filled."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{name}: {what} would take {nbytes / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB free on {device}")
