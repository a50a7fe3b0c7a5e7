"""bct_fast.losses: parity with pytorch-metric-learning and the BCT building blocks."""
import math

import pytest
import torch
import torch.nn.functional as F

from bct_fast import losses
from bct_fast.ops.reference import cosine_margin_cross_entropy_ref



def grads_of(loss_module, x, labels, weight_param):
    x = x.clone().requires_grad_(True)
    value = loss_module(x, labels)
    gx, gw = torch.autograd.grad(value, (x, weight_param))
    return value.detach(), gx, gw


@pytest.mark.parametrize("kind", ["cosface", "arcface", "normsoftmax"])
def test_matches_pytorch_metric_learning(seed, kind):
    # float64 on both sides: the comparison tests the formulas, not fp32 rounding at scale 64.
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")  # absent on the GPU machine
    C, d, B = 37, 24, 11
    x = torch.randn(B, d, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    if kind == "cosface":
        pml, ours = pml_losses.CosFaceLoss(C, d, margin=0.35, scale=64), losses.CosFaceLoss(C, d, scale=64, margin=0.35)
    elif kind == "arcface":  # PML takes degrees, we take radians
        pml, ours = pml_losses.ArcFaceLoss(C, d, margin=28.6, scale=64), losses.ArcFaceLoss(C, d, scale=64, margin=math.radians(28.6))
    else:  # PML temperature = 1 / scale
        pml, ours = pml_losses.NormalizedSoftmaxLoss(C, d, temperature=0.05), losses.NormSoftmaxLoss(C, d, scale=20.0)
    pml.double()
    ours.double().load_pml_weight(pml.W.detach())
    v1, gx1, gw1 = grads_of(pml, x, y, pml.W)
    v2, gx2, gw2 = grads_of(ours, x, y, ours.weight)
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gx1, gx2, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gw1.t(), gw2, rtol=1e-4, atol=1e-6)


def test_load_pml_weight_rejects_wrong_shape():
    with pytest.raises(ValueError, match="W"):
        losses.CosFaceLoss(10, 4).load_pml_weight(torch.randn(10, 4))


@pytest.mark.parametrize("new_dim", [16, 24, 9])
def test_influence_loss_dims_and_frozen_weight(seed, new_dim):
    # float64: the loss is a difference of O(scale) terms; fp32 cancellation would dominate rtol.
    old_w = torch.randn(12, 16, dtype=torch.float64)
    loss = losses.InfluenceLoss(old_w, scale=10.0, margin_type="cosface", margin=0.2)
    x = torch.randn(5, new_dim, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 12, (5,))
    value = loss(x, y)
    value.backward()
    xm = F.pad(x.detach(), (0, 16 - new_dim)) if new_dim < 16 else x.detach()[:, :16]
    ref = cosine_margin_cross_entropy_ref(xm, old_w, y, scale=10.0, margin_type="cosface", margin=0.2)
    assert torch.allclose(value.double(), ref, rtol=1e-5)
    assert loss.old_weight.grad is None and not loss.old_weight.requires_grad
    if new_dim > 16:  # entries past the old width get no gradient from the influence loss
        assert not x.grad[:, 16:].any()


def test_influence_loss_unknown_labels(seed):
    old_w = torch.randn(5, 8, dtype=torch.float64)  # float64: see test above
    x = torch.randn(4, 8, dtype=torch.float64)
    y = torch.tensor([0, 7, 4, 9])
    ignoring = losses.InfluenceLoss(old_w, unknown_labels="ignore")
    expected = cosine_margin_cross_entropy_ref(x[[0, 2]], old_w, y[[0, 2]], scale=30.0)
    assert torch.allclose(ignoring(x, y).double(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        losses.InfluenceLoss(old_w, unknown_labels="raise")(x, y)


def test_bct_loss_terms(seed):
    new = losses.CosFaceLoss(10, 8, scale=16.0)
    infl = losses.InfluenceLoss(torch.randn(6, 8), scale=16.0)
    bct = losses.BCTLoss(new, infl, influence_weight=0.5)
    x, y = torch.randn(7, 8), torch.randint(0, 10, (7,))
    total = bct(x, y)
    t = bct.last_terms
    assert torch.allclose(total, new(x, y) + 0.5 * infl(x, y))
    assert torch.allclose(t["total"], t["new"] + 0.5 * t["influence"])


@pytest.mark.parametrize("make,error,match", [
    (lambda: losses.CosFaceLoss(10, 8, scale=0.0), ValueError, "scale"),
    (lambda: losses.CosFaceLoss(10, 8, margin=float("nan")), ValueError, "margin"),
    (lambda: losses.ArcFaceLoss(10, 8, margin=4.0), ValueError, "margin: ArcFace"),
    (lambda: losses.NormSoftmaxLoss(10, 8, reduction="avg"), ValueError, "reduction"),
    (lambda: losses.NormSoftmaxLoss(10, 8, arcface_grad="ste"), ValueError, "arcface_grad"),
    (lambda: losses.InfluenceLoss(torch.randn(10, 8), label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: losses.InfluenceLoss(torch.randn(10, 8), margin_type="foo"), ValueError, "margin_type"),
    (lambda: losses.BCTLoss(losses.CosFaceLoss(10, 8), losses.InfluenceLoss(torch.randn(10, 8)),
                            influence_weight=float("nan")), ValueError, "influence_weight"),
    (lambda: losses.BCTLoss(losses.CosFaceLoss(10, 8), losses.InfluenceLoss(torch.randn(10, 8)),
                            influence_weight=-1.0), ValueError, "influence_weight"),
    (lambda: losses.BCTLoss("cosface", losses.InfluenceLoss(torch.randn(10, 8))), TypeError, "new_loss"),
])
def test_bad_hyperparameters_fail_at_construction(make, error, match):
    """A bad value fails where it is set, not at the first training step."""
    with pytest.raises(error, match=match):
        make()


def test_l2_compatibility_loss():
    new = torch.tensor([[3.0, 0.0, 5.0], [0.0, 2.0, 1.0]])
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # normalized: row0 -> (1,0) vs (1,0): 0; row1 -> (0,1) vs (1,0): 2.  mean = 1
    assert losses.L2CompatibilityLoss()(new, old).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="old_embeddings"):
        losses.L2CompatibilityLoss()(new, old[:1])


def test_synthesize_classifier(seed):
    old_model = torch.nn.Linear(3, 4, bias=False)
    inputs = torch.randn(40, 3)
    labels = torch.arange(40) % 5  # classes 0..4; old classifier knows 0..2
    loader = [(inputs[i:i + 8], labels[i:i + 8]) for i in range(0, 40, 8)]
    old_w = torch.randn(3, 4)
    w = losses.synthesize_classifier(old_model, loader, old_w, 5, progress=False)
    assert w.shape == (5, 4) and torch.equal(w[:3], old_w)
    with torch.no_grad():
        emb = F.normalize(old_model(inputs), dim=1)
    for k in (3, 4):
        assert torch.allclose(w[k], F.normalize(emb[labels == k].mean(0), dim=0), atol=1e-6)
    with pytest.raises(ValueError, match="loader"):
        losses.synthesize_classifier(old_model, loader, old_w, 7, progress=False)


def test_class_mean_classifier(seed):
    """Every row is the normalized mean of the old model's normalized class embeddings."""
    old_model = torch.nn.Linear(3, 4, bias=False)
    inputs, labels = torch.randn(50, 3), torch.randint(0, 5, (50,))
    labels[:5] = torch.arange(5)  # every class present
    loader = [(inputs[i:i + 16], labels[i:i + 16]) for i in range(0, 50, 16)]
    w = losses.class_mean_classifier(old_model, loader, 5, progress=False)
    raw = losses.class_mean_classifier(old_model, loader, 5, normalize=False, progress=False)
    with torch.no_grad():
        emb = F.normalize(old_model(inputs), dim=1).double()
    for k in range(5):
        mean = emb[labels == k].mean(0)
        assert torch.allclose(raw[k].double(), mean, atol=1e-6)
        assert torch.allclose(w[k].double(), F.normalize(mean, dim=0), atol=1e-6)
    assert old_model.training  # the model's mode is restored
    with pytest.raises(ValueError, match="loader: no samples of classes \\[5, 6\\]"):
        losses.class_mean_classifier(old_model, loader, 7, progress=False)
