"""Atomic file writes and checksums shared by the index and checkpoint formats."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that readers see either the old file or the complete new one.

    ``write(f)`` fills a temporary file in the same directory; it is flushed, fsync'ed and
    renamed over ``path`` (atomic on POSIX and Windows), then the directory entry is synced.
    On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every platform / filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def sha256_of_file(f: BinaryIO, start: int, length: int, block: int = 1 << 24) -> str:
    """sha256 of ``length`` bytes from offset ``start`` (streamed; constant memory)."""
    h = hashlib.sha256()
    f.seek(start)
    left = length
    while left > 0:
        chunk = f.read(min(block, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()
