"""Files that cannot lie: every corruption of a saved GalleryIndex is a clear IndexFileError that
names the file, never a silent load, another exception type, a crash or a hang.

Covers: every single-bit flip of a small index file (and a sample of a larger payload),
truncation at every byte, forged header digests (schema check), version-1 files, a memory-mapped
file truncated in place (SIGBUS), kill -9 during saves, permissions, stale temporaries,
metadata that JSON cannot round-trip, empty indexes, big-endian input, detached storage.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bct_fast._core import io as bio
from bct_fast.gallery import FORMAT_VERSION, GalleryIndex, IndexFileError

fcntl = pytest.importorskip("fcntl")  # POSIX: locks, signals, in-place truncation

METADATA = {"dataset": "synthetic", "split": [1, 2.5, None, True], "nested": {"k": "v"}}


def small_index(n=4, dim=8, labels=True, dtype=torch.float32, seed=0) -> GalleryIndex:
    g = torch.Generator().manual_seed(seed)
    index = GalleryIndex(dim, "old-v1", dtype=dtype, metadata=METADATA)
    index.add(torch.randn(n, dim, generator=g), ids=torch.arange(100, 100 + n),
              labels=torch.randint(0, 5, (n,), generator=g) if labels else None)
    return index


def same_index(a: GalleryIndex, b: GalleryIndex) -> bool:
    as_bits = (lambda t: t.view(torch.int16)) if a.dtype != torch.float32 else (lambda t: t)
    return (a.model_version == b.model_version and a.dim == b.dim and a.dtype == b.dtype
            and a.metadata == b.metadata and len(a) == len(b)
            and torch.equal(as_bits(a.embeddings), as_bits(b.embeddings)) and torch.equal(a.ids, b.ids)
            and (a.labels is None) == (b.labels is None)
            and (a.labels is None or torch.equal(a.labels, b.labels)))


def outcome(path: Path, **load_kwargs) -> str:
    """'named' (IndexFileError naming the file), 'unnamed' (IndexFileError without the path),
    'loaded' (silent load of a changed file), or 'other:<exception type>'."""
    try:
        GalleryIndex.load(path, **load_kwargs)
    except IndexFileError as e:
        return "named" if str(path) in str(e) else "unnamed"
    except Exception as e:  # noqa: BLE001 - counting every other type is the point
        return f"other:{type(e).__name__}"
    return "loaded"


class InPlaceFile:
    """Flip bytes of a file in place (pwrite; truncating and rewriting per case is slow)."""

    def __init__(self, path: Path):
        self.path, self.data = path, path.read_bytes()
        self.fd = os.open(path, os.O_RDWR)

    def flip(self, byte: int, bit: int) -> None:
        os.pwrite(self.fd, bytes([self.data[byte] ^ (1 << bit)]), byte)

    def restore(self, byte: int) -> None:
        os.pwrite(self.fd, self.data[byte:byte + 1], byte)

    def close(self) -> None:
        os.close(self.fd)


def flip_sweep(path: Path, positions, **load_kwargs) -> collections.Counter:
    f = InPlaceFile(path)
    counts = collections.Counter()
    try:
        for byte, bit in positions:
            f.flip(byte, bit)
            counts[outcome(path, **load_kwargs)] += 1
            f.restore(byte)
    finally:
        f.close()
    return counts


# ---- bit flips ---------------------------------------------------------------------------------
def test_format_version_2_layout(tmp_path):
    path = small_index().save(tmp_path / "g.bctidx")
    data = path.read_bytes()
    magic, version, hlen = struct.unpack("<8sII", data[:16])
    assert (magic, version, FORMAT_VERSION) == (b"BCTGIDX\0", 2, 2)
    start = (48 + hlen + 63) // 64 * 64
    assert hashlib.sha256(data[:16] + data[48:start]).digest() == data[16:48]
    header = json.loads(data[48:48 + hlen])
    assert header["payload_offset"] == start and len(data) == start + header["payload_nbytes"]
    assert hashlib.sha256(data[start:]).hexdigest() == header["payload_sha256"]
    assert not any(data[48 + hlen:start])


@pytest.mark.parametrize("labels", [True, False])
def test_every_bit_flip_of_a_small_file_is_a_named_error(tmp_path, labels):
    path = small_index(labels=labels).save(tmp_path / "g.bctidx")
    size = path.stat().st_size
    assert size < 1024  # the whole file is swept: header, padding, payload
    counts = flip_sweep(path, [(byte, bit) for byte in range(size) for bit in range(8)])
    assert counts == {"named": 8 * size}, counts
    assert same_index(GalleryIndex.load(path), small_index(labels=labels))  # restored intact


def test_header_bit_flips_with_mmap_and_without_payload_verification(tmp_path):
    path = small_index().save(tmp_path / "g.bctidx")
    data = path.read_bytes()
    start = (48 + struct.unpack("<I", data[12:16])[0] + 63) // 64 * 64
    everything_before_payload = [(byte, bit) for byte in range(start) for bit in range(8)]
    assert flip_sweep(path, everything_before_payload, mmap=True) == {"named": 8 * start}
    # verify=False skips only the payload digest: the header is still fully checked.
    assert flip_sweep(path, everything_before_payload, verify=False) == {"named": 8 * start}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_payload_bit_flips_of_a_larger_file(tmp_path, dtype):
    index = small_index(n=500, dim=32, dtype=dtype)
    path = index.save(tmp_path / "g.bctidx")
    data = path.read_bytes()
    start = (48 + struct.unpack("<I", data[12:16])[0] + 63) // 64 * 64
    rng = random.Random(0)
    positions = [(rng.randrange(start, len(data)), rng.randrange(8)) for _ in range(300)]
    positions += [(len(data) - 1, 7), (start, 0)]  # last padding byte, first payload byte
    assert flip_sweep(path, positions) == {"named": len(positions)}
    assert flip_sweep(path, positions[:100], mmap=True) == {"named": 100}


# ---- truncation, extension ---------------------------------------------------------------------
def test_truncation_at_every_byte_and_appended_bytes(tmp_path):
    index = small_index()
    data = index.save(tmp_path / "g.bctidx").read_bytes()
    path = tmp_path / "cut.bctidx"
    counts = collections.Counter()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        counts[outcome(path)] += 1
        counts[outcome(path, mmap=True, verify=False)] += 1
    assert counts == {"named": 2 * len(data)}, counts
    for extra in (b"\0", b"\0" * 64, b"x"):
        path.write_bytes(data + extra)
        with pytest.raises(IndexFileError, match="trailing"):
            GalleryIndex.load(path)


# ---- forged header digests: the schema check alone ---------------------------------------------
def resign(data: bytes, header_text: bytes) -> bytes:
    """A v2 file with a replaced header and a recomputed (valid) header digest."""
    hlen = struct.unpack("<I", data[12:16])[0]
    old_start = (48 + hlen + 63) // 64 * 64
    start = (48 + len(header_text) + 63) // 64 * 64
    prefix = data[:8] + struct.pack("<II", 2, len(header_text))
    rest = header_text + bytes(start - 48 - len(header_text))
    return prefix + hashlib.sha256(prefix + rest).digest() + rest + data[old_start:]


def _mutations(h: dict) -> dict:
    def edit(fn):
        g = json.loads(json.dumps(h))
        fn(g)
        return json.dumps(g).encode()
    arrays = h["arrays"]
    return {
        "labels dropped": edit(lambda g: g["arrays"].pop("labels")),
        "embeddings offset +4": edit(lambda g: g["arrays"]["embeddings"].update(offset=4)),
        "ids overlap embeddings": edit(lambda g: g["arrays"]["ids"].update(offset=0)),
        "count + 1": edit(lambda g: g.update(count=g["count"] + 1)),
        "dim as float": edit(lambda g: g.update(dim=float(g["dim"]))),
        "count as bool": edit(lambda g: g.update(count=True)),
        "extra key": edit(lambda g: g.update(extra=1)),
        "missing key": edit(lambda g: g.pop("metadata")),
        "storage dtype": edit(lambda g: g.update(storage_dtype="float16")),
        "array dtype": edit(lambda g: g["arrays"]["ids"].update(dtype="<i4")),
        "shape": edit(lambda g: g["arrays"]["ids"].update(shape=[arrays["ids"]["shape"][0] - 1])),
        "nbytes": edit(lambda g: g["arrays"]["ids"].update(nbytes=arrays["ids"]["nbytes"] + 8)),
        "payload_nbytes": edit(lambda g: g.update(payload_nbytes=g["payload_nbytes"] + 64)),
        "payload_offset": edit(lambda g: g.update(payload_offset=g["payload_offset"] + 64)),
        "digest not hex": edit(lambda g: g.update(payload_sha256="Z" * 64)),
        "format_version field": edit(lambda g: g.update(format_version=1)),
        "empty model_version": edit(lambda g: g.update(model_version="")),
        "metadata not an object": edit(lambda g: g.update(metadata=[1])),
        "duplicate key": json.dumps(h).encode()[:-1] + b', "count": 4}',
        "NaN": edit(lambda g: g["metadata"].update(x=0.5)).replace(b"0.5", b"NaN"),
        "not an object": b"[1, 2]",
        "not UTF-8": b'{"model_version": "\xff"}',
    }


def test_forged_header_digest_is_caught_by_the_schema(tmp_path):
    data = small_index().save(tmp_path / "g.bctidx").read_bytes()
    hlen = struct.unpack("<I", data[12:16])[0]
    h = json.loads(data[48:48 + hlen])
    path = tmp_path / "forged.bctidx"
    path.write_bytes(resign(data, json.dumps(h).encode()))
    assert same_index(GalleryIndex.load(path), small_index())  # re-signing alone changes nothing
    for what, text in _mutations(h).items():
        path.write_bytes(resign(data, text))
        with pytest.raises(IndexFileError, match="inconsistent|unreadable") as e:
            GalleryIndex.load(path)
        assert str(path) in str(e.value), what


# ---- version 1 files ---------------------------------------------------------------------------
def write_v1(index: GalleryIndex, path: Path) -> bytes:
    """The version-1 layout (bct_fast before format 2): header at 16, no header digest."""
    arrays = index._arrays()
    layout, offset, digest, payload = {}, 0, hashlib.sha256(), b""
    for name, a in arrays.items():
        raw = a.tobytes()
        pad = bytes((offset + len(raw) + 63) // 64 * 64 - offset - len(raw))
        layout[name] = {"offset": offset, "nbytes": len(raw), "dtype": a.dtype.str, "shape": list(a.shape)}
        payload += raw + pad
        offset += len(raw) + len(pad)
    digest.update(payload)
    header = json.dumps({"format_version": 1, "model_version": index.model_version, "dim": index.dim,
                         "count": len(index), "storage_dtype": "float32", "metadata": index.metadata,
                         "arrays": layout, "payload_nbytes": offset, "sha256": digest.hexdigest()}).encode()
    head = b"BCTGIDX\0" + struct.pack("<II", 1, len(header)) + header
    data = head + bytes((len(head) + 63) // 64 * 64 - len(head)) + payload
    path.write_bytes(data)
    return data


def test_version_1_files_still_load_and_header_flips_never_raise_other_types(tmp_path):
    index = small_index()
    path = tmp_path / "v1.bctidx"
    data = write_v1(index, path)
    assert same_index(GalleryIndex.load(path), index)
    assert same_index(GalleryIndex.load(path, mmap=True), index)
    hlen = struct.unpack("<I", data[12:16])[0]
    header = data[16:16 + hlen]
    # v1 has no header digest: only a flip inside a free string value can go unnoticed.
    free = [(16 + header.index(b'"old-v1"') + 1, 6)]
    meta = json.dumps(METADATA).encode()
    free += [(16 + header.index(meta), len(meta))]
    start = (16 + hlen + 63) // 64 * 64
    f = InPlaceFile(path)
    counts, silent_outside = collections.Counter(), []
    for byte in range(start):
        for bit in range(8):
            f.flip(byte, bit)
            result = outcome(path)
            counts[result] += 1
            if result == "loaded" and not any(a <= byte < a + n for a, n in free):
                silent_outside.append((byte, bit))
            f.restore(byte)
    f.close()
    assert set(counts) <= {"named", "loaded"}, counts  # never KeyError & co. (459 before)
    assert silent_outside == []
    assert counts["named"] > 0.8 * 8 * start


def test_saving_a_v1_index_upgrades_it(tmp_path):
    path = tmp_path / "v1.bctidx"
    write_v1(small_index(), path)
    GalleryIndex.load(path).save(path)
    assert struct.unpack("<I", path.read_bytes()[8:12])[0] == 2
    assert same_index(GalleryIndex.load(path), small_index())


# ---- memory map + truncation in place (SIGBUS) --------------------------------------------------
_SIGBUS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from bct_fast.gallery import GalleryIndex, IndexFileError
    path, mode = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    index = GalleryIndex(64, "old-v1")
    index.add(torch.randn(4000, 64, generator=g))
    index.save(path)
    mapped = GalleryIndex.load(path, mmap=True)
    mapped.search(torch.randn(2, 64), 3)          # works before
    os.truncate(path, 100)                        # another program truncates the file in place
    if mode == "raw":                             # control: reading the map itself
        print(float(mapped._emb.float().sum()))
    for use in (lambda: mapped.search(torch.randn(2, 64), 3), lambda: mapped.embeddings,
                lambda: mapped.save(path + ".copy"), lambda: mapped.to("cpu")):
        try:
            use()
            print("NO ERROR")
        except IndexFileError as e:
            print("IndexFileError:", e)
""")


def test_truncating_a_mapped_file_is_a_clean_error_never_a_signal(tmp_path):
    procs = {mode: subprocess.Popen([sys.executable, "-c", _SIGBUS_SCRIPT, str(tmp_path / f"{mode}.bctidx"), mode],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("checked", "raw")}
    out = {mode: p.communicate(timeout=120) for mode, p in procs.items()}
    # The control shows the scenario is real: reading the raw map after the truncation is SIGBUS.
    assert procs["raw"].returncode == -signal.SIGBUS, out["raw"]
    stdout, stderr = out["checked"]
    assert procs["checked"].returncode == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 4 and all(l.startswith("IndexFileError:") for l in lines), stdout
    assert all(str(tmp_path / "checked.bctidx") in l and "changed on disk" in l for l in lines)


def test_replacing_a_mapped_file_by_rename_is_safe(tmp_path):
    path = small_index(n=50).save(tmp_path / "g.bctidx")
    mapped = GalleryIndex.load(path, mmap=True)
    before = mapped.search(torch.randn(3, 8), 5)
    small_index(n=20, seed=1).save(path)  # atomic rename: the map keeps the old inode's bytes
    after = mapped.search(torch.randn(3, 8), 5)
    assert len(mapped) == 50 and before.ids.shape == after.ids.shape


def test_in_place_rewrite_of_a_mapped_file_is_detected(tmp_path):
    path = small_index(n=50).save(tmp_path / "g.bctidx")
    mapped = GalleryIndex.load(path, mmap=True)
    st = path.stat()
    with open(path, "r+b") as f:  # same size, new contents, newer mtime
        f.seek(st.st_size - 1)
        f.write(b"\1")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(IndexFileError, match="changed on disk"):
        mapped.search(torch.randn(1, 8), 1)


# ---- kill -9 during saves ----------------------------------------------------------------------
_WRITER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from bct_fast.gallery import GalleryIndex
    path, i = sys.argv[1], int(sys.argv[2])
    index = GalleryIndex(128, f"new-{i}")
    index.add(torch.randn(40000, 128, generator=torch.Generator().manual_seed(i)))  # ~20 MB file
    print("ready", flush=True)
    while True:
        index.save(path)
""")


# Loads only bct_fast/_core/io.py (no torch: starts fast) and dies by SIGKILL mid-write.
_SELF_KILLING_WRITER = textwrap.dedent("""
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("bct_io", sys.argv[1])
    bct_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bct_io)
    def write(f):
        f.write(b"x" * 1000000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    bct_io.atomic_write(sys.argv[2], write)
""")


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_kill_9_during_concurrent_saves_leaves_a_complete_file_and_no_temps(tmp_path):
    path = small_index().save(tmp_path / "g.bctidx")
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, str(path), str(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(5)]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready", w.stderr.read()
        rng = random.Random(0)
        seen = collections.Counter()
        for w in writers:  # five concurrent writers, killed one by one at random moments
            time.sleep(rng.uniform(0.05, 0.6))
            assert w.poll() is None, w.stderr.read()  # alive: no writer lost its temp to a cleaner
            w.send_signal(signal.SIGKILL)
            w.wait(30)
            back = GalleryIndex.load(path)  # old or one complete new index, checksums verified
            seen[back.model_version] += 1
            assert back.model_version == "old-v1" or (len(back) == 40000 and back.dim == 128)
        assert all(w.returncode == -signal.SIGKILL for w in writers)
        left = temps(tmp_path)
        print(f"outcomes {dict(seen)}; temporaries left by the kills: {len(left)}")
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    # A writer killed inside its write (deterministic, unlike the random kills above) leaves
    # its temporary behind ...
    abandoned = subprocess.run([sys.executable, "-c", _SELF_KILLING_WRITER, bio.__file__, str(path)])
    assert abandoned.returncode == -signal.SIGKILL and len(temps(tmp_path)) == 1
    small_index().save(path)  # ... and the next save removes every abandoned temporary of this path
    assert temps(tmp_path) == []
    assert same_index(GalleryIndex.load(path), small_index())


# ---- permissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_0666_minus_umask(tmp_path, umask):
    from bct_fast import train
    old = os.umask(umask)
    try:
        existing = tmp_path / "g.bctidx"
        existing.write_bytes(b"old")
        os.chmod(existing, 0o600)  # replaced files do not keep their mode (documented)
        paths = [small_index().save(existing), small_index().save(tmp_path / "new.bctidx"),
                 train.save_checkpoint(tmp_path / "c.ckpt", {"w": torch.ones(2)})]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


# ---- stale temporaries -------------------------------------------------------------------------
def fake_temp(folder: Path, name: str, age_s: float = 0.0) -> Path:
    p = folder / name
    p.write_bytes(b"partial")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


@pytest.mark.parametrize("via", ["save", "load"])
def test_abandoned_temporaries_of_this_path_only_are_removed(tmp_path, via):
    path = small_index().save(tmp_path / "g.bctidx")
    stale = [fake_temp(tmp_path, ".g.bctidx.0123456789abcdef.tmp", age_s=3600),
             fake_temp(tmp_path, ".g.bctidx.k3j_x9a2.tmp", age_s=10),      # mkstemp-style, older bct_fast
             fake_temp(tmp_path, ".g.bctidx.fedcba9876543210.tmp")]         # fresh but unlocked: writer is dead
    live = fake_temp(tmp_path, ".g.bctidx.00000000aaaaaaaa.tmp", age_s=7200)
    kept = [live,
            fake_temp(tmp_path, ".h.bctidx.0123456789abcdef.tmp", age_s=3600),   # another file's
            fake_temp(tmp_path, ".g.bctidx.x.0123456789abcdef.tmp", age_s=3600),  # file "g.bctidx.x"
            fake_temp(tmp_path, ".g.bctidx.0123456789abcdef.tmp.bak", age_s=3600),
            fake_temp(tmp_path, "g.bctidx.0123456789abcdef.tmp", age_s=3600)]
    os.symlink(tmp_path / "h.bctidx.target", tmp_path / ".g.bctidx.1111111111111111.tmp")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is still running
    try:
        small_index().save(path) if via == "save" else GalleryIndex.load(path)
    finally:
        os.close(fd)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert os.path.islink(tmp_path / ".g.bctidx.1111111111111111.tmp")


def test_without_locks_only_old_temporaries_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(bio, "_try_lock", lambda fd, blocking: None)  # a filesystem without flock
    path = tmp_path / "g.bctidx"
    old = fake_temp(tmp_path, ".g.bctidx.0123456789abcdef.tmp", age_s=bio.STALE_UNLOCKED_AGE_S + 60)
    fresh = fake_temp(tmp_path, ".g.bctidx.fedcba9876543210.tmp", age_s=60)
    assert bio.remove_stale_temps(path) == [old]
    assert fresh.exists()


def test_a_live_writers_temporary_survives_a_concurrent_save(tmp_path):
    path = tmp_path / "x.bin"
    started, release, errors = threading.Event(), threading.Event(), []

    def slow(f):
        f.write(b"first")
        started.set()
        release.wait(10)

    def first():
        try:
            bio.atomic_write(path, slow)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    bio.atomic_write(path, lambda f: f.write(b"second"))  # its cleanup must not take the live temp
    assert len(temps(tmp_path)) == 1
    release.set()
    t.join(10)
    assert errors == [] and path.read_bytes() == b"first" and temps(tmp_path) == []


# ---- metadata ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [
    {}, {"a": 1, "b": -0.0, "c": 1e308, "d": 2 ** 70, "e": None, "f": True, "g": "é ✓ \ud800"},
    {"nested": {"list": [1, [2, {"x": 0.1}]], "empty": {}, "e2": []}},
])
def test_metadata_round_trips_exactly(tmp_path, metadata):
    index = GalleryIndex(4, "m", metadata=metadata)
    index.add(torch.randn(2, 4))
    back = GalleryIndex.load(index.save(tmp_path / "g.bctidx"))
    assert json.dumps(back.metadata) == json.dumps(metadata) and back.metadata == metadata


@pytest.mark.parametrize("metadata,error", [
    ({1: (2, 3)}, TypeError), ({"a": (1, 2)}, TypeError), ({"a": float("nan")}, ValueError),
    ({"a": float("inf")}, ValueError), ({"a": {2, 3}}, TypeError), ({"a": np.float32(1.0)}, TypeError),
    ({"a": b"x"}, TypeError), ({"a": [object()]}, TypeError), ({"a": {"b": {None: 1}}}, TypeError),
    ({"a": collections.OrderedDict(b=1)}, TypeError), ([("a", 1)], TypeError), ("{}", TypeError),
])
def test_metadata_json_cannot_round_trip_is_refused(metadata, error):
    with pytest.raises(error, match="metadata"):
        GalleryIndex(4, "m", metadata=metadata)
    index = GalleryIndex(4, "m")
    with pytest.raises(error, match="metadata"):
        index.metadata = metadata
    assert index.metadata == {}


def test_metadata_changed_in_place_is_refused_at_save(tmp_path):
    index = GalleryIndex(4, "m", metadata={"a": [1]})
    index.metadata["a"].append((2, 3))
    with pytest.raises(TypeError, match="metadata"):
        index.save(tmp_path / "g.bctidx")
    assert not (tmp_path / "g.bctidx").exists()


def test_metadata_is_a_private_copy():
    mine = {"a": [1]}
    index = GalleryIndex(4, "m", metadata=mine)
    mine["a"].append(2)
    assert index.metadata == {"a": [1]}


# ---- empty indexes -----------------------------------------------------------------------------
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_index_saves_and_loads(tmp_path, mmap, dtype):
    path = GalleryIndex(16, "m", dtype=dtype, metadata={"empty": True}).save(tmp_path / "e.bctidx")
    back = GalleryIndex.load(path, mmap=mmap)
    assert len(back) == 0 and back.embeddings.shape == (0, 16) and back.dtype == dtype
    assert back.ids.shape == (0,) and back.labels is None and back.metadata == {"empty": True}
    with pytest.raises(ValueError, match="empty"):
        back.search(torch.randn(1, 16), 1)
    back.add(torch.randn(3, 16), labels=torch.arange(3))
    assert len(back) == 3 and back.search(torch.randn(1, 16), 3).labels.shape == (1, 3)
    size = path.stat().st_size
    assert flip_sweep(path, [(b, bit) for b in range(size) for bit in range(8)]) == {"named": 8 * size}


# ---- byte order, detached storage, devices -----------------------------------------------------
def test_big_endian_arrays_are_accepted(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    ids, labels = np.arange(10, 16, dtype=np.int64), np.arange(6, dtype=np.int64) % 2
    native = GalleryIndex(4, "m")
    native.add(torch.from_numpy(x), ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
    big = GalleryIndex(4, "m")
    big.add(x.astype(">f4"), ids=ids.astype(">i8"), labels=labels.astype(">i8"))
    np.save(tmp_path / "be.npy", x.astype(">f8"))
    from_file = GalleryIndex(4, "m")
    from_file.add(np.load(tmp_path / "be.npy", mmap_mode="r"))
    assert torch.equal(big.embeddings, native.embeddings) and torch.equal(big.ids, native.ids)
    assert torch.equal(big.labels, native.labels)
    assert torch.allclose(from_file.embeddings, native.embeddings)


def test_add_stores_detached_copies():
    model = torch.nn.Linear(4, 4)
    out = model(torch.randn(5, 4))
    labels = torch.arange(5)
    index = GalleryIndex(4, "m")
    index.add(out, labels=labels)
    assert not index.embeddings.requires_grad and index.embeddings.grad_fn is None
    labels[0] = 99  # the caller's tensors are not the index's
    assert int(index.labels[0]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="device"):
        GalleryIndex(4, "m", device="cuda")
    path = small_index().save(tmp_path / "g.bctidx")
    with pytest.raises(ValueError, match="device"):
        GalleryIndex.load(path, device="cuda")
    with pytest.raises(ValueError, match="device"):
        small_index().to("cuda")
