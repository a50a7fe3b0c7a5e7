"""Embedding files as the CLI reads them (bct_fast.embedding_files.load_array): .npy (plain or
memory-mapped) and .safetensors; every unreadable file is a ValueError naming the source."""
import numpy as np
import pytest
import torch

from bct_fast.embedding_files import load_array


def test_npy_plain_and_mapped(tmp_path):
    a = np.random.rand(7, 3).astype(np.float32)
    np.save(tmp_path / "e.npy", a)
    t = load_array(tmp_path / "e.npy", "--query")
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(a))
    m = load_array(tmp_path / "e.npy", "--query", mmap=True)
    assert isinstance(m, np.memmap) and np.array_equal(m, a)
    np.save(tmp_path / "l.npy", np.arange(7))  # labels: never mapped (not a 2-D float array)
    assert torch.equal(load_array(tmp_path / "l.npy", "--query-labels", mmap=True), torch.arange(7))


@pytest.mark.parametrize("content,needle", [(b"", "not a readable .npy file"),
                                            (b"\x93NUMPY garbage", "not a readable .npy file")])
def test_npy_unreadable(tmp_path, content, needle):
    (tmp_path / "e.npy").write_bytes(content)
    with pytest.raises(ValueError, match=f"--query: {needle}"):
        load_array(tmp_path / "e.npy", "--query")


def test_npy_of_objects_or_strings_is_refused(tmp_path):
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="--query-labels: .* holds <U1 data, expected numbers"):
        load_array(tmp_path / "s.npy", "--query-labels")
    np.save(tmp_path / "o.npy", np.array([object()]), allow_pickle=True)
    with pytest.raises(ValueError, match="--query: not a readable .npy file"):  # pickles are never loaded
        load_array(tmp_path / "o.npy", "--query")


def test_safetensors_picks_embeddings_then_labels_then_the_first(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    e, lab, other = torch.randn(5, 4), torch.arange(5), torch.randn(2, 2)
    st.save_file({"other": other, "embeddings": e, "labels": lab}, str(tmp_path / "a.safetensors"))
    assert torch.equal(load_array(tmp_path / "a.safetensors", "--query"), e)
    st.save_file({"labels": lab, "zzz": other}, str(tmp_path / "b.safetensors"))
    assert torch.equal(load_array(tmp_path / "b.safetensors", "--query-labels"), lab)
    st.save_file({"only": other}, str(tmp_path / "c.safetensors"))
    assert torch.equal(load_array(tmp_path / "c.safetensors", "--query"), other)


def test_safetensors_unreadable_or_empty(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="--gallery: not a readable .safetensors file"):
        load_array(tmp_path / "bad.safetensors", "--gallery")
    st.save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="--gallery: .* holds no tensors"):
        load_array(tmp_path / "empty.safetensors", "--gallery")


def test_missing_directory_and_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match="--query: file not found"):
        load_array(tmp_path / "nope.npy", "--query")
    with pytest.raises(ValueError, match="--query: is a directory"):
        load_array(tmp_path, "--query")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .npy or .safetensors file"):
        load_array(tmp_path / "e.pt", "--query")
