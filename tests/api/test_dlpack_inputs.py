"""cupy arrays (and any DLPack producer: JAX, ...) in search, metrics and evaluation: viewed, not
copied, and the same results as the tensors they wrap. cupy itself runs in the GPU tests
(tests/ops/test_topk*.py); here a minimal CPU producer stands in for it, so CI checks the paths."""
import re

import numpy as np
import pytest
import torch

from bct_fast._core.arrays import dlpack_view, input_tensor
from bct_fast.evaluate import compatibility_matrix, cross_test
from bct_fast.metrics import cmc_curve, evaluate_retrieval, pair_scores, retrieval_metrics, tar_at_far
from bct_fast.search import cosine_topk


class Producer:
    """An object that only speaks DLPack (no __array__, not a tensor), like a cupy array."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __dlpack__(self, **kwargs):
        return self.t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


class Broken:
    def __dlpack__(self, **kwargs):
        raise BufferError("cannot export")

    def __dlpack_device__(self):
        return (1, 0)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, gal = torch.randn(30, 16, generator=g), torch.randn(80, 16, generator=g)
    return q, torch.randint(0, 5, (30,), generator=g), gal, torch.randint(0, 5, (80,), generator=g)


def test_a_producer_is_viewed_without_a_copy():
    t = torch.randn(7, 3)
    v = dlpack_view(Producer(t), "x")
    assert isinstance(v, torch.Tensor) and v.data_ptr() == t.data_ptr()
    labels = torch.arange(5)
    assert input_tensor(Producer(labels), "labels").data_ptr() == labels.data_ptr()
    a = np.arange(4)
    assert torch.equal(input_tensor(a, "labels"), torch.arange(4))  # numpy labels: tensors
    assert dlpack_view(a, "x") is a  # numpy embeddings keep their path (memmaps by chunks)


def test_search_and_metrics_match_the_wrapped_tensors():
    q, ql, g, gl = data()
    s, i = cosine_topk(Producer(q), Producer(g), 7)
    s0, i0 = cosine_topk(q, g, 7)
    assert torch.equal(s, s0) and torch.equal(i, i0)
    ref = evaluate_retrieval(q, ql, g, gl)
    assert evaluate_retrieval(Producer(q), Producer(ql), Producer(g), Producer(gl)) == ref
    assert evaluate_retrieval(q.numpy(), ql.numpy(), g.numpy(), gl.numpy()) == ref
    assert evaluate_retrieval(Producer(q), Producer(ql)) == evaluate_retrieval(q, ql)
    assert retrieval_metrics(Producer(i0), Producer(ql), Producer(gl)) == retrieval_metrics(i0, ql, gl)
    assert torch.equal(cmc_curve(Producer(i0), ql.numpy(), Producer(gl)), cmc_curve(i0, ql, gl))
    assert torch.equal(pair_scores(Producer(q), Producer(q + 1)), pair_scores(q, q + 1))
    sc, same = torch.rand(200), torch.rand(200) > 0.5
    assert tar_at_far(Producer(sc), Producer(same)) == tar_at_far(sc, same)


def test_evaluation_matches_the_wrapped_tensors():
    q, ql, g, gl = data(1)
    new_q, new_g = q + 0.3 * torch.randn_like(q), g + 0.3 * torch.randn_like(g)
    ref = cross_test(q, new_q, ql, old_gallery=g, new_gallery=new_g, gallery_labels=gl)
    got = cross_test(Producer(q), Producer(new_q), Producer(ql), old_gallery=Producer(g),
                     new_gallery=Producer(new_g), gallery_labels=Producer(gl))
    assert (got.old_old, got.new_new, got.new_old) == (ref.old_old, ref.new_new, ref.new_old)
    cm = compatibility_matrix({"v1": Producer(q), "v2": Producer(new_q)}, Producer(ql))
    assert cm.values == compatibility_matrix({"v1": q, "v2": new_q}, ql).values


@pytest.mark.parametrize("call,name", [
    (lambda b: evaluate_retrieval(b, torch.zeros(3, dtype=torch.int64)), "query"),
    (lambda b: evaluate_retrieval(torch.randn(3, 4), b), "query_labels"),
    (lambda b: cross_test(torch.randn(3, 4), b, torch.zeros(3, dtype=torch.int64)), "new_query"),
    (lambda b: compatibility_matrix({"v1": b}, torch.zeros(3, dtype=torch.int64)), "embeddings['v1']"),
    (lambda b: tar_at_far(b, torch.ones(3, dtype=torch.bool)), "scores"),
    (lambda b: cosine_topk(torch.randn(3, 4), b, 1), "gallery"),
])
def test_an_object_torch_cannot_import_is_named(call, name):
    with pytest.raises(TypeError, match=re.escape(f"{name}: a DLPack object torch cannot import")):
        call(Broken())


def test_indexes_take_producers():
    from bct_fast.search import FlatIndex, GalleryIndex

    q, ql, g, gl = data(2)
    ref = GalleryIndex(dim=16, model_version="v1")
    ref.add(g, labels=gl)
    idx = GalleryIndex(dim=16, model_version="v1")
    idx.add(Producer(g), labels=Producer(gl), ids=Producer(torch.arange(80)))
    a, b = idx.search(Producer(q), 5), ref.search(q, 5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert torch.equal(idx.to("cpu").search(q, 5).labels, b.labels)  # to(): moved in place, same answers
    flat, flat_ref = FlatIndex(16), FlatIndex(16)
    flat.add(Producer(g))
    flat_ref.add(g)
    D, I = flat.search(Producer(q), 4)
    D0, I0 = flat_ref.search(q, 4)
    assert torch.equal(I, I0) and torch.equal(D, D0)
    with pytest.raises(TypeError, match=re.escape("queries: a DLPack object torch cannot import")):
        idx.search(Broken(), 1)
