"""``GalleryIndex``: a searchable gallery of embeddings with ids, labels and the model version
that produced them, saved in a versioned, checksummed file written atomically.

The model version matters for backward-compatible retrieval: a gallery embedded by the OLD
model is searched with NEW-model queries, and the index records which model built it.

File format (version 1), little-endian::

    b"BCTGIDX\\0" | u32 format_version | u32 header_len | header (JSON) | zero pad to 64
    | payload: embeddings, ids, labels (each 64-byte aligned)

The JSON header holds the model version, dim, count, storage dtype, user metadata, each
array's offset/size/dtype/shape and the payload's sha256. ``load`` checks all of it and
raises :class:`IndexFileError` naming what is wrong (bad magic, newer format, truncated file,
checksum mismatch, inconsistent shapes).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bct_fast._core.checks import check_device, check_labels, check_matrix
from bct_fast._core.io import atomic_write, sha256_of_file
from bct_fast.ops import cosine_topk

__all__ = ["GalleryIndex", "IndexFileError", "SearchResult", "FORMAT_VERSION"]

MAGIC = b"BCTGIDX\0"
FORMAT_VERSION = 1
_ALIGN = 64
_STORAGE = {  # storage dtype -> (torch dtype, numpy dtype of the raw bytes)
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bf16: raw 16-bit words
}
_STORAGE_NAME = {torch_dtype: name for name, (torch_dtype, _) in _STORAGE.items()}


class IndexFileError(ValueError):
    """A gallery index file is not readable: wrong format, truncated, corrupted or inconsistent."""


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours of each query: gallery rows, their ids and labels (None if unlabeled)."""
    scores: Tensor   # [Q, k] float32 cosine similarity, descending
    indices: Tensor  # [Q, k] int64 gallery rows
    ids: Tensor      # [Q, k] int64 ids of those rows
    labels: Tensor | None  # [Q, k] int64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class GalleryIndex:
    """Exact cosine index over embeddings produced by one model version.

    Rows are L2-normalized when added and stored in ``dtype`` (float32, float16 or bfloat16:
    half the memory for million-row galleries, scores still accumulate in fp32).

    Example::

        index = GalleryIndex(dim=512, model_version="resnet50-v1")
        index.add(old_model_embeddings, labels=labels)
        index.save("gallery.bctidx")
        index = GalleryIndex.load("gallery.bctidx", mmap=True)   # larger than RAM: memory-mapped
        hits = index.search(new_model_queries, k=10)             # cross-model (BCT) search
    """

    def __init__(self, dim: int, model_version: str, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", metadata: dict[str, Any] | None = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive integer, got {dim!r}")
        if not isinstance(model_version, str) or not model_version:
            raise ValueError(f"model_version: expected a non-empty string, got {model_version!r}")
        if dtype not in _STORAGE_NAME:
            raise TypeError(f"dtype: expected one of {list(_STORAGE_NAME)}, got {dtype}")
        json.dumps(metadata or {})  # fail now, not at save time, if it is not JSON-serializable
        self.dim, self.model_version, self.dtype = dim, model_version, dtype
        self.device = check_device(device)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._emb = torch.empty(0, dim, dtype=dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._labels: Tensor | None = None

    # ---- contents -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._emb.shape[0]

    def __repr__(self) -> str:
        return (f"GalleryIndex(model_version={self.model_version!r}, rows={len(self)}, dim={self.dim}, "
                f"dtype={self.dtype}, labeled={self._labels is not None}, device={self.device})")

    @property
    def embeddings(self) -> Tensor:
        """[N, dim] normalized rows in the storage dtype."""
        return self._emb

    @property
    def ids(self) -> Tensor:
        return self._ids

    @property
    def labels(self) -> Tensor | None:
        return self._labels

    def add(self, embeddings: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Append rows; returns their ids (default: consecutive, after the largest id so far).

        ids must be unique across the index. Either every add carries labels or none does."""
        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(np.array(embeddings))
        check_matrix(embeddings, "embeddings")
        n = embeddings.shape[0]
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings: dim {embeddings.shape[1]} != index dim {self.dim}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings: contains NaN or inf")
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self) else 0
            ids = torch.arange(start, start + n, dtype=torch.int64)
        ids = check_labels(ids, "ids", n, None).to(self.device, torch.int64)
        if torch.unique(ids).numel() != n or bool(torch.isin(ids, self._ids).any()):
            raise ValueError("ids: must be unique across the index (duplicate ids given)")
        if labels is None and self._labels is not None:
            raise ValueError("labels: this index is labeled; every add needs labels")
        if labels is not None:
            if len(self) and self._labels is None:
                raise ValueError("labels: this index was built without labels")
            labels = check_labels(labels, "labels", n, None).to(self.device, torch.int64)
        rows = torch.nn.functional.normalize(embeddings.to(self.device, torch.float32), dim=1).to(self.dtype)
        self._emb = torch.cat([self._emb, rows])
        self._ids = torch.cat([self._ids, ids])
        if labels is not None:
            self._labels = labels if self._labels is None else torch.cat([self._labels, labels])
        return ids

    def to(self, device: str | torch.device) -> "GalleryIndex":
        """Move the index (in place) and return it."""
        self.device = check_device(device)
        self._emb, self._ids = self._emb.to(self.device), self._ids.to(self.device)
        if self._labels is not None:
            self._labels = self._labels.to(self.device)
        return self

    # ---- search ---------------------------------------------------------------------------
    def search(self, queries, k: int, *, chunk_size: int | None = None, progress: bool = False) -> SearchResult:
        """Exact top-k cosine neighbours of ``queries`` [Q, dim] (any model whose embeddings are
        compatible with this index's model; with BCT, a newer one). CUDA queries against a CPU
        (or memory-mapped) index stream the gallery to the GPU in chunks."""
        if len(self) == 0:
            raise ValueError("index: is empty; add embeddings before searching")
        if isinstance(queries, np.ndarray):
            queries = torch.from_numpy(np.array(queries))
        check_matrix(queries, "queries")
        # Rows are stored normalized: normalize the queries only (no pass over the gallery norms).
        qn = torch.nn.functional.normalize(queries.float() if queries.dtype != torch.float64 else queries, dim=1)
        scores, rows = cosine_topk(qn, self._emb, k, normalize=False, chunk_size=chunk_size, progress=progress)
        rows_here = rows.to(self.device)
        ids = self._ids[rows_here].to(rows.device)
        labels = self._labels[rows_here].to(rows.device) if self._labels is not None else None
        return SearchResult(scores, rows, ids, labels)

    # ---- persistence ----------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        emb = self._emb.detach().cpu().contiguous()
        raw = emb.view(torch.int16).numpy().view("<u2") if self.dtype == torch.bfloat16 else emb.numpy()
        arrays = {"embeddings": raw.astype(_STORAGE[_STORAGE_NAME[self.dtype]][1], copy=False),
                  "ids": self._ids.cpu().numpy().astype("<i8", copy=False)}
        if self._labels is not None:
            arrays["labels"] = self._labels.cpu().numpy().astype("<i8", copy=False)
        return arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically (temporary file + rename): a crash never leaves a partial
        file under ``path``."""
        arrays = self._arrays()
        layout, offset, digest = {}, 0, hashlib.sha256()
        for name, a in arrays.items():
            layout[name] = {"offset": offset, "nbytes": a.nbytes, "dtype": a.dtype.str, "shape": list(a.shape)}
            pad = _align(a.nbytes) - a.nbytes
            digest.update(memoryview(np.ascontiguousarray(a)).cast("B"))
            digest.update(b"\0" * pad)
            offset += a.nbytes + pad
        header = json.dumps({
            "format_version": FORMAT_VERSION, "model_version": self.model_version, "dim": self.dim,
            "count": len(self), "storage_dtype": _STORAGE_NAME[self.dtype], "metadata": self.metadata,
            "arrays": layout, "payload_nbytes": offset, "sha256": digest.hexdigest(),
        }).encode()

        def write(f):
            f.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header)
            f.write(b"\0" * (_align(16 + len(header)) - 16 - len(header)))
            for a in arrays.values():
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
                f.write(b"\0" * (_align(a.nbytes) - a.nbytes))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False, verify: bool = True,
             device: str | torch.device = "cpu") -> "GalleryIndex":
        """Read an index written by :meth:`save`.

        Args:
            mmap: memory-map the embeddings (copy-on-write; the file is never modified) instead
                of reading them: galleries larger than RAM, searched by streaming.
            verify: check the payload's sha256 (reads the whole file once).
            device: where to put the index (ignored with ``mmap``, which stays on the host).

        Raises:
            FileNotFoundError; IndexFileError for anything wrong with the file's contents."""
        path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise IndexFileError(f"{path}: not a bct_fast gallery index (bad magic or too short)")
            version, hlen = struct.unpack("<II", head[8:])
            if version > FORMAT_VERSION or version < 1:
                raise IndexFileError(f"{path}: format version {version} is not supported by this "
                                     f"bct_fast (reads versions 1..{FORMAT_VERSION}); upgrade bct_fast")
            raw = f.read(hlen)
            if len(raw) < hlen:
                raise IndexFileError(f"{path}: truncated (header cut short)")
            try:
                h = json.loads(raw)
                start = _align(16 + hlen)
                arrays, payload = h["arrays"], int(h["payload_nbytes"])
                count, dim, storage = int(h["count"]), int(h["dim"]), h["storage_dtype"]
                model_version, digest = h["model_version"], h["sha256"]
            except (ValueError, KeyError, TypeError) as e:
                raise IndexFileError(f"{path}: unreadable header ({e})") from None
            if size < start + payload:
                raise IndexFileError(f"{path}: truncated ({size} bytes, expected {start + payload})")
            if size > start + payload:
                raise IndexFileError(f"{path}: {size - start - payload} unexpected trailing bytes")
            if storage not in _STORAGE:
                raise IndexFileError(f"{path}: unknown storage dtype {storage!r}")
            expect = {"embeddings": ([count, dim], _STORAGE[storage][1].str), "ids": ([count], "<i8")}
            if "labels" in arrays:
                expect["labels"] = ([count], "<i8")
            for name, (shape, dt) in expect.items():
                spec = arrays.get(name)
                if (spec is None or spec["shape"] != shape or spec["dtype"] != dt
                        or spec["nbytes"] != int(np.prod(shape)) * np.dtype(dt).itemsize
                        or spec["offset"] + spec["nbytes"] > payload):
                    raise IndexFileError(f"{path}: array {name!r} is missing or inconsistent with "
                                         f"count={count}, dim={dim}")
            if verify and sha256_of_file(f, start, payload) != digest:
                raise IndexFileError(f"{path}: checksum mismatch (the file is corrupted)")

            def read(name: str) -> np.ndarray:
                spec = arrays[name]
                dt = np.dtype(spec["dtype"])
                if mmap and name == "embeddings" and count > 0:
                    return np.memmap(path, dtype=dt, mode="c", offset=start + spec["offset"], shape=tuple(spec["shape"]))
                f.seek(start + spec["offset"])
                return np.frombuffer(f.read(spec["nbytes"]), dtype=dt).reshape(spec["shape"]).copy()

            emb_np, ids_np = read("embeddings"), read("ids")
            labels_np = read("labels") if "labels" in arrays else None

        index = cls(dim, model_version, dtype=_STORAGE[storage][0], device="cpu" if mmap else device,
                    metadata=h.get("metadata") or {})
        emb = torch.from_numpy(emb_np)
        if storage == "bfloat16":
            emb = emb.view(torch.int16).view(torch.bfloat16)
        index._emb = emb.to(index.device)
        index._ids = torch.from_numpy(ids_np).to(index.device)
        index._labels = torch.from_numpy(labels_np).to(index.device) if labels_np is not None else None
        if verify and torch.unique(index._ids).numel() != count:
            raise IndexFileError(f"{path}: duplicate ids")
        return index
