"""``GalleryIndex``: a searchable gallery of embeddings with ids, labels and the model version
that produced them, saved in a versioned, checksummed file written atomically.

The model version matters for backward-compatible retrieval: a gallery embedded by the OLD
model is searched with NEW-model queries, and the index records which model built it.

File format (version 2), little-endian::

    offset 0   b"BCTGIDX\\0"                        magic (8 bytes)
           8   u32 format_version = 2
          12   u32 header_len (H)
          16   sha256 (32 raw bytes) of bytes [0, 16) + bytes [48, P)
          48   header: H bytes of UTF-8 JSON
        48+H   zero padding up to P = 48 + H rounded up to a multiple of 64
           P   payload: embeddings | ids | labels (optional), each starting at a multiple
               of 64 and zero-padded to one; the payload's sha256 is in the header

The header holds exactly: format_version, model_version, dim, count, storage_dtype, metadata,
arrays (each array's offset relative to P, nbytes, dtype, shape), payload_offset (P),
payload_nbytes and payload_sha256. Every byte of the file is covered: the prefix digest covers
magic, version, header length, header and padding (and itself: a changed digest mismatches),
the payload digest covers the arrays and their padding, and the file size must be exactly
P + payload_nbytes. On top of the checksums the header must pass a strict schema check: its
exact key set and types, and the one array layout that (count, dim, storage dtype, labeled)
allows. ``load`` raises :class:`IndexFileError` naming the file and what is wrong.

Version 1 files (written by earlier bct_fast; same layout without the prefix digest, header at
offset 16, payload digest under ``sha256``) are still read, with the same schema check and
payload checksum. Their header is not checksummed, so a corruption inside one of its string
values (model version, metadata) cannot be detected: save such a file again to upgrade it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from bct_fast._core.arrays import input_tensor
from bct_fast._core.checks import check_device, check_labels, check_matrix
from bct_fast._core.io import atomic_write, remove_stale_temps, sha256_of_file
from bct_fast.ops import cosine_topk, normalize_rows

__all__ = ["GalleryIndex", "IndexFileError", "SearchResult", "FORMAT_VERSION"]

MAGIC = b"BCTGIDX\0"
FORMAT_VERSION = 2
_ALIGN = 64
_PREFIX = struct.Struct("<8sII")     # magic, format version, header length
_V2_HEAD = _PREFIX.size + 32         # ... then the 32-byte digest of everything before the payload
_MAX_HEADER = 1 << 26                # 64 MiB of JSON: larger is a corrupted length, not metadata
_HEADER_KEYS = {
    1: {"format_version", "model_version", "dim", "count", "storage_dtype", "metadata", "arrays",
        "payload_nbytes", "sha256"},
    2: {"format_version", "model_version", "dim", "count", "storage_dtype", "metadata", "arrays",
        "payload_offset", "payload_nbytes", "payload_sha256"},
}
_STORAGE = {  # storage dtype -> (torch dtype, numpy dtype of the raw bytes)
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bf16: raw 16-bit words
}
_STORAGE_NAME = {torch_dtype: name for name, (torch_dtype, _) in _STORAGE.items()}


class IndexFileError(ValueError):
    """A gallery index file is not readable: wrong format, truncated, corrupted or inconsistent,
    or (memory-mapped) changed on disk after it was loaded."""


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours of each query: gallery rows, their ids and labels (None if unlabeled)."""
    scores: Tensor   # [Q, k] float32 cosine similarity, descending
    indices: Tensor  # [Q, k] int64 gallery rows
    ids: Tensor      # [Q, k] int64 ids of those rows
    labels: Tensor | None  # [Q, k] int64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ---- metadata: only what JSON gives back exactly ------------------------------------------------
def check_metadata(value: Any, where: str = "metadata") -> None:
    """Raise TypeError / ValueError (naming ``where``) unless ``value`` survives a JSON round trip
    unchanged: plain dicts with str keys, lists, str, int, finite float, bool and None."""
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not representable in JSON")
        return
    if type(value) is list:
        for i, item in enumerate(value):
            check_metadata(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where}: key {key!r} is not a str ({type(key).__name__}); JSON keys "
                                f"are strings (it would load as {str(key)!r})")
            check_metadata(item, f"{where}[{key!r}]")
        return
    hint = " (use a list: a tuple would load as a list)" if isinstance(value, tuple) else ""
    raise TypeError(f"{where}: {type(value).__name__} {value!r:.60} does not round-trip through JSON "
                    f"(allowed: dict with str keys, list, str, int, finite float, bool, None){hint}")


def _copy_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """A validated private copy (later changes to the caller's object do not leak in)."""
    if metadata is None:
        return {}
    if type(metadata) is not dict:
        raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
    check_metadata(metadata)
    return json.loads(json.dumps(metadata))


def _usable_device(device: object, name: str = "device") -> torch.device:
    """``check_device`` plus: the device exists in this process (no CUDA build / no GPU)."""
    d = check_device(device, name)
    try:
        torch.empty(0, device=d)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"{name}: {d} is not available here ({e})") from None
    return d


def _byte_view(a: np.ndarray) -> memoryview:
    """The raw bytes of an array without a copy (also for 0 rows)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


# ---- header schema ------------------------------------------------------------------------------
def _canonical_layout(count: int, dim: int, storage: str, labeled: bool) -> tuple[dict, int]:
    """The one array layout a writer produces for this shape: (arrays spec, payload bytes)."""
    shapes = {"embeddings": ([count, dim], _STORAGE[storage][1]), "ids": ([count], np.dtype("<i8"))}
    if labeled:
        shapes["labels"] = ([count], np.dtype("<i8"))
    layout, offset = {}, 0
    for name, (shape, dt) in shapes.items():
        nbytes = int(np.prod(shape)) * dt.itemsize
        layout[name] = {"offset": offset, "nbytes": nbytes, "dtype": dt.str, "shape": shape}
        offset += _align(nbytes)
    return layout, offset


def _is_int(v: object, low: int = 0) -> bool:
    return type(v) is int and v >= low


def _is_hex_digest(v: object) -> bool:
    return type(v) is str and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _canonical(v: object) -> str:
    """Type-exact comparison key (1 == 1.0 == True in Python, not in a file)."""
    return json.dumps(v, sort_keys=True)


@dataclass(frozen=True)
class _Header:
    model_version: str
    dim: int
    count: int
    storage: str
    metadata: dict
    arrays: dict
    payload_start: int
    payload_nbytes: int
    payload_sha256: str


def _parse_json(path: Path, raw: bytes) -> dict:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, an object at the top."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key in {keys}")
        return dict(pairs)

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")
    try:
        h = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFileError(f"{path}: unreadable header ({e})") from None
    if type(h) is not dict:
        raise IndexFileError(f"{path}: unreadable header (not a JSON object)")
    return h


def _check_header(path: Path, h: dict, version: int, payload_start: int) -> _Header:
    """The schema: exact keys and types, and the canonical layout for (count, dim, dtype)."""
    def bad(what: str) -> IndexFileError:
        return IndexFileError(f"{path}: inconsistent header ({what})")
    if set(h) != _HEADER_KEYS[version]:
        raise bad(f"keys {sorted(h)}, expected {sorted(_HEADER_KEYS[version])}")
    if h["format_version"] != version or type(h["format_version"]) is not int:
        raise bad(f"format_version {h['format_version']!r} in a version {version} file")
    if type(h["model_version"]) is not str or not h["model_version"]:
        raise bad(f"model_version {h['model_version']!r}")
    if not _is_int(h["dim"], 1) or not _is_int(h["count"], 0):
        raise bad(f"dim={h['dim']!r}, count={h['count']!r}")
    if h["storage_dtype"] not in _STORAGE:
        raise bad(f"unknown storage dtype {h['storage_dtype']!r}")
    if type(h["metadata"]) is not dict:
        raise bad("metadata is not an object")
    arrays = h["arrays"]
    if type(arrays) is not dict or not {"embeddings", "ids"} <= set(arrays) <= {"embeddings", "ids", "labels"}:
        raise bad(f"arrays {arrays!r:.100}")
    layout, nbytes = _canonical_layout(h["count"], h["dim"], h["storage_dtype"], "labels" in arrays)
    if _canonical(arrays) != _canonical(layout):
        raise bad(f"arrays do not match count={h['count']}, dim={h['dim']}, "
                  f"storage_dtype={h['storage_dtype']}: {arrays!r:.200}")
    if h["payload_nbytes"] != nbytes or type(h["payload_nbytes"]) is not int:
        raise bad(f"payload_nbytes {h['payload_nbytes']!r}, the arrays need {nbytes}")
    if version >= 2 and (h["payload_offset"] != payload_start or type(h["payload_offset"]) is not int):
        raise bad(f"payload_offset {h['payload_offset']!r}, the header ends at {payload_start}")
    digest = h["payload_sha256" if version >= 2 else "sha256"]
    if not _is_hex_digest(digest):
        raise bad(f"payload checksum {digest!r:.80}")
    try:
        check_metadata(h["metadata"])
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    return _Header(h["model_version"], h["dim"], h["count"], h["storage_dtype"], h["metadata"], arrays,
                   payload_start, nbytes, digest)


def _read_exact(f: BinaryIO, path: Path, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IndexFileError(f"{path}: truncated ({what} cut short)")
    return data


def _read_header(f: BinaryIO, path: Path, size: int) -> _Header:
    """Magic, version, header length, header checksum (v2) and schema; nothing else read."""
    if size < _PREFIX.size:
        raise IndexFileError(f"{path}: not a bct_fast gallery index (too short: {size} bytes; truncated?)")
    prefix = _read_exact(f, path, _PREFIX.size, "prefix")
    magic, version, hlen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise IndexFileError(f"{path}: not a bct_fast gallery index (bad magic {magic!r})")
    if version not in (1, 2):
        raise IndexFileError(f"{path}: format version {version} is not supported by this bct_fast "
                             f"(reads versions 1..{FORMAT_VERSION}): written by a newer bct_fast "
                             f"(upgrade) or the file is corrupted")
    head = _PREFIX.size if version == 1 else _V2_HEAD
    start = _align(head + hlen)
    if hlen > _MAX_HEADER or start > size:
        raise IndexFileError(f"{path}: truncated or corrupted: the header ({hlen} bytes) ends at {start}, "
                             f"the file has {size} bytes")
    digest = _read_exact(f, path, 32, "header checksum") if version >= 2 else None
    raw_and_pad = _read_exact(f, path, start - head, "header")
    if digest is not None and hashlib.sha256(prefix + raw_and_pad).digest() != digest:
        raise IndexFileError(f"{path}: header checksum mismatch (magic, version, header length, header "
                             f"or its padding is corrupted)")
    if any(raw_and_pad[hlen:]):
        raise IndexFileError(f"{path}: corrupted (non-zero header padding)")
    return _check_header(path, _parse_json(path, raw_and_pad[:hlen]), version, start)


class _MappedFile:
    """The open file behind a memory-mapped index. Reading a map whose file was truncated in
    place kills the process with SIGBUS, so every use first compares the file's identity
    (device, inode, size, mtime) with the one it had when it was opened and verified."""

    def __init__(self, f: BinaryIO, path: Path, identity: tuple[int, int, int, int]):
        self.path, self._f, self._identity = path, f, identity
        weakref.finalize(self, f.close)

    @staticmethod
    def identity_of(f: BinaryIO) -> tuple[int, int, int, int]:
        st = os.fstat(f.fileno())
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def check(self) -> None:
        now = self.identity_of(self._f)
        if now != self._identity:
            raise IndexFileError(
                f"{self.path}: changed on disk since it was memory-mapped (size {self._identity[2]} -> "
                f"{now[2]} bytes, mtime {self._identity[3]} -> {now[3]} ns); reading it could crash the "
                f"process: load the index again (replace index files by rename, as save does)")


def _read_payload(f: BinaryIO, path: Path, h: _Header, verify: bool) -> bytearray:
    """The whole payload in one pass, hashed as it is read (what is checked is what is used)."""
    buf = bytearray(h.payload_nbytes)
    view, digest, done = memoryview(buf), hashlib.sha256(), 0
    f.seek(h.payload_start)
    while done < len(buf):
        n = f.readinto(view[done:done + (1 << 24)])
        if not n:
            raise IndexFileError(f"{path}: truncated (payload cut short while reading)")
        if verify:
            digest.update(view[done:done + n])
        done += n
    if verify and digest.hexdigest() != h.payload_sha256:
        raise IndexFileError(f"{path}: checksum mismatch (the payload is corrupted)")
    return buf


def _array_from(buf: bytearray, spec: dict) -> np.ndarray:
    dt, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    if spec["nbytes"] == 0:
        return np.empty(shape, dt.newbyteorder("="))
    a = np.frombuffer(buf, dtype=dt, count=int(np.prod(shape)), offset=spec["offset"]).reshape(shape)
    return a.astype(dt.newbyteorder("="), copy=False)


def _arrays_in_memory(f: BinaryIO, path: Path, h: _Header, verify: bool) -> dict[str, np.ndarray]:
    buf = _read_payload(f, path, h, verify)
    return {name: _array_from(buf, spec) for name, spec in h.arrays.items()}


def _arrays_mapped(f: BinaryIO, path: Path, h: _Header, verify: bool) -> dict[str, np.ndarray]:
    """Embeddings memory-mapped (copy-on-write: the file is never modified), ids and labels read.
    The checksum is streamed (constant memory)."""
    if verify and sha256_of_file(f, h.payload_start, h.payload_nbytes) != h.payload_sha256:
        raise IndexFileError(f"{path}: checksum mismatch (the payload is corrupted)")
    out = {}
    for name, spec in h.arrays.items():
        dt, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        if name == "embeddings" and spec["nbytes"]:
            out[name] = np.memmap(f, dtype=dt, mode="c", offset=h.payload_start + spec["offset"], shape=shape)
        else:
            f.seek(h.payload_start + spec["offset"])
            raw = bytearray(_read_exact(f, path, spec["nbytes"], name))
            out[name] = _array_from(raw, dict(spec, offset=0))
    return out


class GalleryIndex:
    """Exact cosine index over embeddings produced by one model version.

    Rows are L2-normalized when added and stored in ``dtype`` (float32, float16 or bfloat16:
    half the memory for million-row galleries, scores still accumulate in fp32).

    What "exact" means with fp16 / bf16 storage: the stored row is the unit row rounded to that
    dtype (its norm is within a few 2^-8 of 1), and a score is the inner product of the unit
    query with the stored row, exact to fp32 accumulation (~1e-7); the ranking is the exact
    ranking of those stored values. It is not the cosine of the stored row, which differs by up
    to the rounding of its norm (~1e-4 for bf16).

    Example::

        index = GalleryIndex(dim=512, model_version="resnet50-v1")
        index.add(old_model_embeddings, labels=labels)
        index.save("gallery.bctidx")
        index = GalleryIndex.load("gallery.bctidx", mmap=True)   # larger than RAM: memory-mapped
        hits = index.search(new_model_queries, k=10)             # cross-model (BCT) search

    ``metadata`` must survive JSON unchanged (dicts with str keys, lists, str, int, finite
    float, bool, None): anything else is refused when set, not silently changed on save.
    """

    def __init__(self, dim: int, model_version: str, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", metadata: dict[str, Any] | None = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        if not isinstance(model_version, str) or not model_version:
            raise ValueError(f"model_version: expected a non-empty string, got {model_version!r}")
        if dtype not in _STORAGE_NAME:
            raise TypeError(f"dtype: expected one of {list(_STORAGE_NAME)}, got {dtype}")
        self.dim, self.model_version, self.dtype = dim, model_version, dtype
        self.device = _usable_device(device)
        self.metadata = metadata
        self._emb = torch.empty(0, dim, dtype=dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._labels: Tensor | None = None
        self._mapped: _MappedFile | None = None  # set by load(mmap=True)

    # ---- contents -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._emb.shape[0]

    def __repr__(self) -> str:
        return (f"GalleryIndex(model_version={self.model_version!r}, rows={len(self)}, dim={self.dim}, "
                f"dtype={self.dtype}, labeled={self._labels is not None}, device={self.device})")

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata saved with the index (a JSON object)."""
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, Any] | None) -> None:
        self._metadata = _copy_metadata(value)

    def _rows(self) -> Tensor:
        """The embeddings, after checking that a memory-mapped file is still intact."""
        if self._mapped is not None:
            self._mapped.check()
        return self._emb

    @property
    def embeddings(self) -> Tensor:
        """[N, dim] normalized rows in the storage dtype. For a memory-mapped index the file is
        checked when this is called, not when the returned tensor is read later."""
        return self._rows()

    @property
    def ids(self) -> Tensor:
        return self._ids

    @property
    def labels(self) -> Tensor | None:
        return self._labels

    def add(self, embeddings: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Append rows; returns their ids (default: consecutive, after the largest id so far).

        ids must be unique across the index. Either every add carries labels or none does.
        numpy arrays of either byte order are accepted. The index stores detached copies: adding
        ``model(x)`` outside ``no_grad`` keeps no autograd graph alive, and later in-place
        changes to the caller's tensors do not reach the index."""
        embeddings, ids, labels = (input_tensor(embeddings, "embeddings"), input_tensor(ids, "ids"),
                                   input_tensor(labels, "labels"))
        check_matrix(embeddings, "embeddings")
        embeddings = embeddings.detach()
        n = embeddings.shape[0]
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings: dim {embeddings.shape[1]} != index dim {self.dim}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings: contains NaN or inf")
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self) else 0
            ids = torch.arange(start, start + n, dtype=torch.int64)
        ids = check_labels(ids, "ids", n, None).detach().to(self.device, torch.int64)
        if torch.unique(ids).numel() != n or bool(torch.isin(ids, self._ids).any()):
            raise ValueError("ids: must be unique across the index (duplicate ids given)")
        if labels is None and self._labels is not None:
            raise ValueError("labels: this index is labeled; every add needs labels")
        if labels is not None:
            if len(self) and self._labels is None:
                raise ValueError("labels: this index was built without labels")
            labels = check_labels(labels, "labels", n, None).detach().to(self.device, torch.int64)
        rows = normalize_rows(embeddings.to(self.device, torch.float32)).to(self.dtype)
        self._emb = torch.cat([self._rows(), rows])  # a new tensor: the index is in memory from here
        self._mapped = None
        self._ids = torch.cat([self._ids, ids])
        if labels is not None:
            self._labels = labels.clone() if self._labels is None else torch.cat([self._labels, labels])
        return ids

    def to(self, device: str | torch.device) -> "GalleryIndex":
        """Move the index (in place) and return it."""
        device = _usable_device(device)
        self._emb, self._ids = self._rows().to(device), self._ids.to(device)
        if self._labels is not None:
            self._labels = self._labels.to(device)
        if device.type != "cpu":
            self._mapped = None  # copied off the map
        self.device = device
        return self

    # ---- search ---------------------------------------------------------------------------
    def search(self, queries, k: int, *, chunk_size: int | None = None, progress: bool = False) -> SearchResult:
        """Exact top-k cosine neighbours of ``queries`` [Q, dim] (any model whose embeddings are
        compatible with this index's model; with BCT, a newer one). CUDA queries against a CPU
        (or memory-mapped) index stream the gallery to the GPU in chunks.

        A memory-mapped index first checks that its file was not changed in place since
        ``load`` (else :class:`IndexFileError`); see :meth:`load` for what that guarantees."""
        if len(self) == 0:
            raise ValueError("index: is empty; add embeddings before searching")
        queries = input_tensor(queries, "queries")  # numpy in any byte order, cupy, ...
        check_matrix(queries, "queries")
        gallery = self._rows()
        # Rows are stored normalized: normalize the queries only (no pass over the gallery norms).
        qn = normalize_rows(queries.float() if queries.dtype != torch.float64 else queries)
        out = qn.device  # results come back on the queries' device
        if self.device.type == "cuda" and out.type == "cpu":
            qn = qn.to(self.device)  # a GPU index searches on its GPU
        scores, rows = cosine_topk(qn, gallery, k, normalize=False, chunk_size=chunk_size, progress=progress)
        rows_here = rows.to(self.device)
        ids = self._ids[rows_here].to(out)
        labels = self._labels[rows_here].to(out) if self._labels is not None else None
        return SearchResult(scores.to(out), rows.to(out), ids, labels)

    # ---- persistence ----------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        emb = self._rows().detach().cpu().contiguous()
        raw = emb.view(torch.int16).numpy().view("<u2") if self.dtype == torch.bfloat16 else emb.numpy()
        arrays = {"embeddings": raw.astype(_STORAGE[_STORAGE_NAME[self.dtype]][1], copy=False),
                  "ids": self._ids.cpu().numpy().astype("<i8", copy=False)}
        if self._labels is not None:
            arrays["labels"] = self._labels.cpu().numpy().astype("<i8", copy=False)
        return arrays

    def _header_bytes(self, layout: dict, payload_nbytes: int, payload_sha256: str) -> bytes:
        """prefix | header digest | header JSON | zero padding: everything before the payload."""
        fields = {"format_version": FORMAT_VERSION, "model_version": self.model_version, "dim": self.dim,
                  "count": len(self), "storage_dtype": _STORAGE_NAME[self.dtype], "metadata": self.metadata,
                  "arrays": layout, "payload_offset": 0, "payload_nbytes": payload_nbytes,
                  "payload_sha256": payload_sha256}
        while True:  # the payload offset depends on the header's length, which holds it
            raw = json.dumps(fields).encode()
            start = _align(_V2_HEAD + len(raw))
            if start == fields["payload_offset"]:
                break
            fields["payload_offset"] = start
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw))
        rest = raw + bytes(start - _V2_HEAD - len(raw))
        return prefix + hashlib.sha256(prefix + rest).digest() + rest

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index in format version 2 (see the module docstring), atomically: a crash
        never leaves a partial file under ``path`` (see :func:`bct_fast._core.io.atomic_write`
        for permissions and the cleanup of temporaries left by killed writers). An empty index
        is saved too (0 rows)."""
        check_metadata(self.metadata)  # it may have been changed in place since it was set
        arrays = self._arrays()
        layout, payload_nbytes = _canonical_layout(len(self), self.dim, _STORAGE_NAME[self.dtype], "labels" in arrays)
        digest = hashlib.sha256()
        for a in arrays.values():
            digest.update(_byte_view(a))
            digest.update(bytes(_align(a.nbytes) - a.nbytes))
        head = self._header_bytes(layout, payload_nbytes, digest.hexdigest())

        def write(f):
            f.write(head)
            for a in arrays.values():
                f.write(_byte_view(a))
                f.write(bytes(_align(a.nbytes) - a.nbytes))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False, verify: bool = True,
             device: str | torch.device = "cpu") -> "GalleryIndex":
        """Read an index written by :meth:`save` (format version 2, or 1 from earlier versions).

        Every byte is checked: the header's checksum and schema always, the payload's checksum
        with ``verify`` (streamed in constant memory with ``mmap``), and the exact file size.

        Args:
            mmap: memory-map the embeddings (copy-on-write; the file is never modified) instead
                of reading them: galleries larger than RAM, searched by streaming.
            verify: check the payload's sha256 (reads the whole file once). The header is
                always checked.
            device: where to put the index (ignored with ``mmap``, which stays on the host).

        Memory-mapped indexes and files changed on disk: replacing the file by rename (as
        :meth:`save` does) is always safe, the map keeps the old file's contents. A file
        truncated or rewritten IN PLACE by another program would make reads of the map crash
        the process (SIGBUS), so :meth:`search`, :attr:`embeddings`, :meth:`save`,
        :meth:`add` and :meth:`to` first check the file's size and mtime against those seen at
        load and raise :class:`IndexFileError` if they changed. Guaranteed: a change made
        before such a call is a clean error. Not guaranteed: a truncation that happens WHILE a
        search reads the map (or while you hold the tensor from :attr:`embeddings`) can still
        crash the process; POSIX offers no safe shared mapping of a file others may truncate.
        Load with ``mmap=False`` (a private copy in memory) where that risk is not acceptable.

        Also removes temporaries of this path left behind by killed writers (see
        :func:`bct_fast._core.io.remove_stale_temps`).

        Raises:
            FileNotFoundError; IndexFileError for anything wrong with the file's contents;
            ValueError if ``device`` is not available."""
        path = Path(path)
        device = _usable_device(device)
        remove_stale_temps(path)
        f = open(path, "rb")
        try:
            index = cls._load_open(f, path, mmap, verify, device)
        except BaseException:
            f.close()
            raise
        if index._mapped is None:
            f.close()
        return index

    @classmethod
    def _load_open(cls, f: BinaryIO, path: Path, mmap: bool, verify: bool, device: torch.device) -> "GalleryIndex":
        identity = _MappedFile.identity_of(f)
        size = identity[2]
        h = _read_header(f, path, size)
        end = h.payload_start + h.payload_nbytes
        if size < end:
            raise IndexFileError(f"{path}: truncated ({size} bytes, expected {end})")
        if size > end:
            raise IndexFileError(f"{path}: {size - end} unexpected trailing bytes")
        arrays = (_arrays_mapped if mmap else _arrays_in_memory)(f, path, h, verify)
        index = cls(h.dim, h.model_version, dtype=_STORAGE[h.storage][0], device="cpu" if mmap else device,
                    metadata=h.metadata)
        emb = torch.from_numpy(arrays["embeddings"])
        if h.storage == "bfloat16":
            emb = emb.view(torch.int16).view(torch.bfloat16)
        index._emb = emb.to(index.device)
        index._ids = torch.from_numpy(arrays["ids"]).to(index.device)
        index._labels = torch.from_numpy(arrays["labels"]).to(index.device) if "labels" in arrays else None
        if mmap and h.count:
            index._mapped = _MappedFile(f, path, identity)
            index._mapped.check()  # changed in place while we were verifying / mapping it
        if verify and torch.unique(index._ids).numel() != h.count:
            raise IndexFileError(f"{path}: duplicate ids")
        return index
