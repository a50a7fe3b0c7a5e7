"""Atomic file writes, stale-temporary cleanup and checksums shared by the on-disk formats."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

try:  # advisory locks mark a temporary file as "being written" (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_write", "remove_stale_temps", "sha256_of_file", "temp_name_pattern",
           "STALE_UNLOCKED_AGE_S"]

# Where locks do not work (some network / FUSE filesystems), an unlocked temporary is only
# considered abandoned once it is this old: no save of ours runs for an hour without writing.
STALE_UNLOCKED_AGE_S = 3600.0

# Our temporaries: ".<name>.<token>.tmp". The token is 16 hex digits today; 8 characters of
# [a-z0-9_] is what tempfile.mkstemp produced in earlier versions (their leftovers match too).
_TOKEN = r"[a-z0-9_]{8,32}"


def temp_name_pattern(path: str | os.PathLike) -> re.Pattern:
    """Regex matching the names of our temporary files for exactly ``path`` (same directory)."""
    return re.compile(rf"\.{re.escape(Path(path).name)}\.{_TOKEN}\.tmp")


def _try_lock(fd: int, blocking: bool) -> bool | None:
    """Exclusive flock on ``fd``: True if taken, False if another open file holds it, None if
    this platform / filesystem has no working locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: locks are not supported here
        return None


def _same_file(name: Path, fd: int) -> bool:
    """Whether the directory entry ``name`` still refers to the open file ``fd``."""
    try:
        a, b = os.stat(name, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_stale(candidate: Path, now: float) -> bool:
    """Unlink one temporary of ours if no writer holds it. Returns whether it was removed."""
    try:
        fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # gone already, a symlink, or not ours to read
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
            return False  # only our own regular files: never another user's write in progress
        locked = _try_lock(fd, blocking=False)
        if locked is False:
            return False  # a live writer holds it
        if locked is None and now - st.st_mtime < STALE_UNLOCKED_AGE_S:
            return False  # cannot tell without locks: keep anything recent
        # Under our lock the name cannot be renamed by its writer; check it is still this file.
        if not _same_file(candidate, fd):
            return False
        os.unlink(candidate)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove abandoned temporary files of :func:`atomic_write` for exactly ``path``.

    A temporary is abandoned when its writer died (``kill -9``, power loss) before the rename.
    Every writer holds an exclusive ``flock`` on its temporary for the file's whole life and
    the lock dies with the process, so a temporary that is NOT locked is abandoned. Only files
    named like our temporaries of this very path, regular, and owned by the current user are
    considered. Where the filesystem has no locks, only temporaries older than
    :data:`STALE_UNLOCKED_AGE_S` are removed. Best effort: errors (read-only directory, races
    with another cleaner) are ignored. Returns the removed paths."""
    path = Path(path)
    pattern = temp_name_pattern(path)
    try:
        names = [n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
    except OSError:
        return []
    now = time.time()
    return [path.parent / n for n in names if _remove_if_stale(path.parent / n, now)]


def _create_locked_temp(path: Path) -> tuple[int, Path]:
    """Create and lock a fresh temporary next to ``path``: (fd, name).

    Mode ``0o666 & ~umask``, like a plain ``open(path, "wb")`` (``mkstemp`` would give 0600, which
    another user, e.g. a search service, cannot read)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, flags, 0o666)
        _try_lock(fd, blocking=True)
        # A cleaner may have unlinked the name between our open and our lock (it saw the file
        # unlocked): then start over with a new name.
        if _same_file(tmp, fd):
            return fd, tmp
        os.close(fd)


def _sync_directory(folder: Path) -> None:
    """Make a rename durable (not possible on every platform / filesystem)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def writable_folder(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) and check that a file can be made in
    it, before any long work whose results would go there; OSError (with the path) otherwise."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".bct_fast_probe_")
    os.close(fd)
    os.unlink(probe)
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so that readers see either the old file or the complete new one.

    ``write(f)`` fills a temporary file ``.<name>.<random>.tmp`` in the same directory; it is
    flushed, fsync'ed and renamed over ``path`` (atomic on POSIX and Windows), then the
    directory entry is synced. On any error the temporary file is removed and ``path`` is
    untouched.

    - Permissions: the new file gets ``0o666 & ~umask`` (what ``open(path, "w")`` gives a new
      file), also when it replaces an existing file: the mode of the old file is NOT kept.
    - Stale temporaries: the writer holds an exclusive ``flock`` on its temporary until the
      rename, and every call first removes this path's temporaries that no live writer holds
      (left behind by a killed process; see :func:`remove_stale_temps`). Temporaries of other
      files, and of writers still running, are never touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = _create_locked_temp(path)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # still under our lock: no cleaner can take the name meanwhile
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)  # releases the lock
    _sync_directory(path.parent)
    return path


def sha256_of_file(f: BinaryIO, start: int, length: int, block: int = 1 << 24) -> str:
    """sha256 of ``length`` bytes from offset ``start`` (streamed; constant memory). A file
    shorter than ``start + length`` hashes what is there (the digest then will not match)."""
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
