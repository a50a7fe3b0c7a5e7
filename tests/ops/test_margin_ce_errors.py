"""Bad input raises a clear exception that names the argument."""
import pytest
import torch

from bct_fast.ops import cosine_margin_cross_entropy as loss_fn


def ok_inputs():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 9])


@pytest.mark.parametrize("mutate,exc,needle", [
    (lambda x, w, y: (x[0], w, y), ValueError, "embeddings"),
    (lambda x, w, y: (x, w[:, :5], y), ValueError, "weight"),
    (lambda x, w, y: (x, w, y[:3]), ValueError, "labels"),
    (lambda x, w, y: (x, w, y.float()), TypeError, "labels"),
    (lambda x, w, y: (x.long(), w, y), TypeError, "embeddings"),
    (lambda x, w, y: (x, w[:0], y), ValueError, "weight"),
    (lambda x, w, y: (x, w, torch.tensor([0, 1, 2, 10])), ValueError, "labels"),
    (lambda x, w, y: (x, w, torch.tensor([0, -5, 2, 3])), ValueError, "labels"),
    (lambda x, w, y: (x, w.to("meta"), y), ValueError, "weight"),
    (lambda x, w, y: ([[1.0]], w, y), TypeError, "embeddings"),
])
def test_bad_tensors(mutate, exc, needle):
    x, w, y = mutate(*ok_inputs())
    with pytest.raises(exc, match=needle):
        loss_fn(x, w, y)


@pytest.mark.parametrize("which", ["embeddings", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs(which, value):
    x, w, y = ok_inputs()
    (x if which == "embeddings" else w)[1, 3] = value
    with pytest.raises(ValueError, match=which):
        loss_fn(x, w, y)


@pytest.mark.parametrize("kw,needle", [
    (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(margin_type="sphereface"), "margin_type"),
    (dict(margin_type="arcface", margin=4.0), "margin"),
    (dict(margin_type="none", margin=0.2), "margin"),
    (dict(margin_type="combined", margin=0.2), "margin"),
    (dict(reduction="avg"), "reduction"),
    (dict(arcface_grad="ste"), "arcface_grad"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_options(kw, needle):
    with pytest.raises(ValueError, match=needle):
        loss_fn(*ok_inputs(), **kw)
