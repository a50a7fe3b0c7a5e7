"""FlatIndex against faiss's flat-index conventions and faiss's own test construction.

Restated (not vendored) from facebookresearch/faiss tests/test_index.py, TestIndexFlat.do_test
with METRIC_INNER_PRODUCT: uniform random data (d = 32, nb = 1000), k = 10, several nq; the
result must match brute force (faiss allows a few index mismatches from fp32 ties; we demand
exactness up to fp32 near-ties via the float64 oracle) and faiss's own IndexFlatIP. Then the
conventions a faiss user relies on: numpy in -> numpy out, k > ntotal padding, empty batches,
incremental adds; and the stated differences: tie order, NaN."""
import numpy as np
import pytest
import torch

from bct_fast.search import FlatIndex
from topk_reference import assert_topk_matches_reference


def dataset(d, nb, nq, seed=1338):
    rs = np.random.RandomState(seed)
    return rs.rand(nb, d).astype("float32"), rs.rand(nq, d).astype("float32")


@pytest.mark.parametrize("nq", [1, 10, 200])
def test_faiss_flat_ip_case(nq):
    xb, xq = dataset(32, 1000, nq)
    index = FlatIndex(32)
    index.add(xb)
    D, I = index.search(xq, 10)
    assert isinstance(D, np.ndarray) and D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (nq, 10)
    all_dis = xq.astype(np.float64) @ xb.astype(np.float64).T
    Dref = np.take_along_axis(all_dis, np.argsort(-all_dis, axis=1, kind="stable")[:, :10], 1)
    np.testing.assert_almost_equal(Dref, D, decimal=5)
    assert_topk_matches_reference(torch.from_numpy(D), torch.from_numpy(I), torch.from_numpy(xq),
                                  torch.from_numpy(xb), 10, atol=1e-5, normalize=False)
    faiss = pytest.importorskip("faiss")
    ref = faiss.IndexFlatIP(32)
    ref.add(xb)
    Df, If = ref.search(xq, 10)
    assert (If != I).sum() <= I.size * 0.0002  # faiss's own tolerance for fp32 ties
    np.testing.assert_allclose(Df, D, rtol=1e-5, atol=1e-5)


def test_padding_empty_batches_and_incremental_adds():
    xb, xq = dataset(8, 5, 3)
    index = FlatIndex(8)
    assert index.ntotal == 0 and index.is_trained
    D, I = index.search(xq, 2)  # empty index: all padding
    assert (I == -1).all() and (D == -np.finfo(np.float32).max).all()
    index.add(xb[:2])
    index.add(xb[2:])
    assert index.ntotal == 5
    D, I = index.search(xq, 7)
    assert (I[:, 5:] == -1).all() and (D[:, 5:] == -np.finfo(np.float32).max).all()
    assert sorted(I[0, :5].tolist()) == [0, 1, 2, 3, 4]
    D0, I0 = index.search(np.zeros((0, 8), np.float32), 4)
    assert D0.shape == (0, 4) and I0.shape == (0, 4)
    faiss = pytest.importorskip("faiss")
    ref = faiss.IndexFlatIP(8)
    ref.add(xb)
    Df, If = ref.search(xq, 7)
    np.testing.assert_array_equal(If[:, 5:], I[:, 5:])
    np.testing.assert_array_equal(Df[:, 5:], D[:, 5:])
    index.reset()
    assert index.ntotal == 0


def test_torch_in_torch_out_and_cosine_metric():
    xb, xq = dataset(6, 50, 4)
    index = FlatIndex(6, metric="cosine")
    index.add(torch.from_numpy(xb) * 1e3)
    D, I = index.search(torch.from_numpy(xq), 3)
    assert isinstance(D, torch.Tensor) and isinstance(I, torch.Tensor)
    assert_topk_matches_reference(D, I, torch.from_numpy(xq), torch.from_numpy(xb), 3)


def test_stated_differences_ties_and_nan():
    """Duplicates: ascending row (faiss returns [1, 0]); NaN: an error (faiss returns -1 rows)."""
    xb = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
    index = FlatIndex(4)
    index.add(xb)
    _, I = index.search(xb[:1], 3)
    assert I.tolist() == [[0, 1, 2]]
    q = xb[:1].copy()
    q[0, 0] = np.nan
    with pytest.raises(ValueError, match="queries: contains NaN"):
        index.search(q, 2)
    with pytest.raises(ValueError, match="x: contains NaN"):
        index.add(q)


@pytest.mark.parametrize("args,exc,needle", [((0,), ValueError, "d"), ((4, "l2"), ValueError, "metric")])
def test_constructor_errors(args, exc, needle):
    with pytest.raises(exc, match=needle):
        FlatIndex(*args)


def test_search_errors():
    index = FlatIndex(4)
    with pytest.raises(ValueError, match="x: expected shape"):
        index.search(np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k"):
        index.search(np.zeros((2, 4), np.float32), 0)
