"""GalleryIndex: search matches the float64 top-k, save/load round trips, atomic writes, bad files."""
import hashlib
import json
import struct

import pytest
import torch

from bct_fast.gallery import FORMAT_VERSION, GalleryIndex, IndexFileError
from topk_reference import assert_topk_matches_reference


def make_index(n=300, dim=16, dtype=torch.float32, labels=True, **kw):
    x = torch.randn(n, dim)
    index = GalleryIndex(dim, "old-v1", dtype=dtype, metadata={"dataset": "synthetic"}, **kw)
    ids = torch.randperm(10 * n)[:n]
    index.add(x, ids=ids, labels=torch.randint(0, 7, (n,)) if labels else None)
    return index, x, ids


def test_search_maps_rows_to_ids_and_labels(seed):
    index, x, ids = make_index()
    q = torch.randn(11, 16)
    res = index.search(q, 9)
    assert_topk_matches_reference(res.scores, res.indices, q, x, 9)
    assert torch.equal(res.ids, ids[res.indices]) and torch.equal(res.labels, index.labels[res.indices])


def test_incremental_add_and_default_ids(seed):
    index = GalleryIndex(8, "m")
    a = index.add(torch.randn(5, 8))
    b = index.add(torch.randn(3, 8))
    assert a.tolist() == [0, 1, 2, 3, 4] and b.tolist() == [5, 6, 7] and len(index) == 8
    with pytest.raises(ValueError, match="ids"):
        index.add(torch.randn(2, 8), ids=torch.tensor([1, 100]))
    with pytest.raises(ValueError, match="ids"):
        index.add(torch.randn(2, 8), ids=torch.tensor([50, 50]))
    with pytest.raises(ValueError, match="labels"):
        index.add(torch.randn(2, 8), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dim"):
        index.add(torch.randn(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        index.add(torch.full((1, 8), float("nan")))
    with pytest.raises(TypeError, match="ids: expected a torch.Tensor"):
        index.add(torch.randn(2, 8), ids=[60, 61])
    with pytest.raises(TypeError, match="ids: expected an integer tensor"):
        index.add(torch.randn(2, 8), ids=torch.tensor([60.0, 61.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("labels", [True, False])
def test_save_load_round_trip(seed, tmp_path, dtype, mmap, labels):
    index, x, ids = make_index(dtype=dtype, labels=labels)
    path = index.save(tmp_path / "g.bctidx")
    back = GalleryIndex.load(path, mmap=mmap)
    assert back.model_version == "old-v1" and back.metadata == {"dataset": "synthetic"}
    assert back.dtype == dtype and len(back) == len(index)
    assert torch.equal(back.embeddings.view(torch.int16) if dtype != torch.float32 else back.embeddings,
                       index.embeddings.view(torch.int16) if dtype != torch.float32 else index.embeddings)
    assert torch.equal(back.ids, ids)
    assert (back.labels is None) == (not labels) and (not labels or torch.equal(back.labels, index.labels))
    q = torch.randn(4, 16)
    r1, r2 = index.search(q, 5), back.search(q, 5, chunk_size=64)
    assert torch.equal(r1.ids, r2.ids)


def test_mmap_load_never_writes_the_file(tmp_path, seed):
    index, _, _ = make_index()
    path = index.save(tmp_path / "g.bctidx")
    before = path.read_bytes()
    back = GalleryIndex.load(path, mmap=True)
    back.embeddings[0, 0] = 42.0  # copy-on-write mapping
    del back
    assert path.read_bytes() == before
    GalleryIndex.load(path)  # still valid


def test_failed_save_leaves_the_old_file(tmp_path, seed, monkeypatch):
    index, _, _ = make_index()
    path = index.save(tmp_path / "g.bctidx")
    before = path.read_bytes()
    bigger, _, _ = make_index(n=500)

    def boom(self):
        raise OSError("disk full")
    monkeypatch.setattr(GalleryIndex, "_arrays", boom)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.bctidx"]  # no temporary file left


def test_atomic_write_cleans_up_on_error(tmp_path):
    from bct_fast._core.io import atomic_write

    def partial(f):
        f.write(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.bin", partial)
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path):
    index, _, _ = make_index()
    return index.save(tmp_path / "g.bctidx")


def test_truncated_file(tmp_path, seed):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (3, 12, 40, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(IndexFileError, match="truncated|too short|header"):
            GalleryIndex.load(path)


def test_corrupted_payload_and_trailing_bytes(tmp_path, seed):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        GalleryIndex.load(path)
    GalleryIndex.load(path, verify=False)  # the caller may skip the check
    path.write_bytes(bytes(data) + b"xx")
    with pytest.raises(IndexFileError, match="trailing"):
        GalleryIndex.load(path, verify=False)


def test_bad_magic_newer_version_and_bad_header(tmp_path, seed):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(b"NOTANIDX" + data[8:])
    with pytest.raises(IndexFileError, match="magic"):
        GalleryIndex.load(path)
    path.write_bytes(data[:8] + struct.pack("<I", FORMAT_VERSION + 1) + data[12:])
    with pytest.raises(IndexFileError, match="version"):
        GalleryIndex.load(path)
    hlen = struct.unpack("<I", data[12:16])[0]
    header = json.loads(data[48:48 + hlen])  # v2: magic, version, length, 32-byte digest, header
    header["count"] += 1
    raw = json.dumps(header).encode().ljust(hlen)[:hlen]
    path.write_bytes(data[:48] + raw + data[48 + hlen:])
    with pytest.raises(IndexFileError, match="header checksum"):
        GalleryIndex.load(path)
    # Even with a recomputed (forged) header digest, the schema check catches the inconsistency.
    start = (48 + hlen + 63) // 64 * 64
    forged = hashlib.sha256(data[:16] + raw + data[48 + hlen:start]).digest()
    path.write_bytes(data[:16] + forged + raw + data[48 + hlen:])
    with pytest.raises(IndexFileError, match="inconsistent"):
        GalleryIndex.load(path)
    with pytest.raises(FileNotFoundError):
        GalleryIndex.load(tmp_path / "missing.bctidx")


def test_constructor_and_search_errors():
    with pytest.raises(ValueError, match="dim"):
        GalleryIndex(0, "m")
    with pytest.raises(ValueError, match="model_version"):
        GalleryIndex(4, "")
    with pytest.raises(TypeError, match="dtype"):
        GalleryIndex(4, "m", dtype=torch.int8)
    with pytest.raises(TypeError):
        GalleryIndex(4, "m", metadata={"x": object()})
    with pytest.raises(ValueError, match="empty"):
        GalleryIndex(4, "m").search(torch.randn(1, 4), 1)
    index = GalleryIndex(4, "m")
    index.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="k"):
        index.search(torch.randn(1, 4), 4)


def test_search_module_exports_gallery_index():
    import bct_fast.search as search
    assert search.GalleryIndex is GalleryIndex


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage_is_exact_for_the_stored_rows(seed, dtype):
    """The documented meaning of exact for fp16/bf16 storage: scores are the inner products of
    the unit queries with the stored (rounded) rows, and the ranking is theirs."""
    x, q = torch.randn(3000, 64), torch.randn(6, 64)
    index = GalleryIndex(64, "v", dtype=dtype)
    index.add(x)
    res = index.search(q, 20)
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    full = qn @ index.embeddings.double().T
    assert torch.allclose(res.scores.double(), full.gather(1, res.indices), atol=1e-6)
    ref = full.topk(21, dim=1).values
    decided = (ref[:, :-1] - ref[:, 1:]) > 1e-6  # ranks not within fp32 noise of the next one
    assert torch.allclose(res.scores.double()[decided[:, :20]], ref[:, :20][decided[:, :20]], atol=1e-6)
