"""pytorch-metric-learning's own loss test cases, restated against bct_fast's losses through the
interface a PML user touches (forward with indices_tuple, get_logits, W, weight_init_func).

Restated (not vendored) from KevinMusgrave/pytorch-metric-learning tests/losses/
test_arcface_loss.py, test_cosface_loss.py and test_normalized_softmax_loss.py: 180 embeddings
on the unit circle, 10 classes, the loss against F.cross_entropy on hand-built logits from
``loss.W``, then ``get_logits``. Differences, each deliberate: ArcFace's margin is given in
radians here (PML: degrees); past theta + m > pi ArcFace uses insightface's monotonic fallback
cos(theta) - m sin(m) where PML keeps the non-monotonic cos(theta + m) (bct_fast.ops.margins);
PML's NormalizedSoftmax test uses an unnormalized dot-product
distance, which bct_fast does not offer (its embeddings are unit vectors, so the values agree)."""
import math

import pytest
import torch
import torch.nn.functional as F

from bct_fast import losses

DTYPES = [torch.float32, torch.float64]


def circle_embeddings(dtype):
    angles = torch.arange(0, 180, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(angles), torch.sin(angles)], 1).to(dtype).requires_grad_(True)


def run_case(loss_func, dtype):
    """PML's case: loss and backward on 180 circle embeddings with random labels; returns the
    loss, the detached embeddings, the labels and PML-layout normalized class columns."""
    emb = circle_embeddings(dtype)
    labels = torch.randint(0, 10, (180,))
    loss = loss_func(emb, labels)
    loss.backward()
    return loss.detach().to(dtype), emb.detach(), labels, F.normalize(loss_func.W.detach(), p=2, dim=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pml_arcface_case(seed, dtype):
    margin_deg, scale = 30, 64
    loss_func = losses.ArcFaceLoss(10, 2, margin=math.radians(margin_deg), scale=scale).to(dtype)
    loss, emb, labels, weights = run_case(loss_func, dtype)
    logits = F.normalize(emb) @ weights
    m = math.radians(margin_deg)
    for i, c in enumerate(labels):
        theta = torch.acos(logits[i, c].clamp(-1, 1))
        # PML: cos(theta + m) everywhere; bct_fast (insightface): the fallback past pi
        logits[i, c] = torch.cos(theta + m) if theta + m <= math.pi else logits[i, c] - m * math.sin(m)
    correct = F.cross_entropy(logits * scale, labels)
    assert torch.isclose(loss, correct, rtol=1e-5)
    assert torch.allclose(loss_func.get_logits(emb).to(dtype), F.normalize(emb) @ weights * scale,
                          rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pml_cosface_case(seed, dtype):
    margin, scale = 0.5, 64
    loss, emb, labels, weights = run_case(losses.CosFaceLoss(10, 2, margin=margin, scale=scale).to(dtype), dtype)
    logits = F.normalize(emb) @ weights
    logits[torch.arange(180), labels] -= margin
    assert torch.isclose(loss, F.cross_entropy(logits * scale, labels), rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pml_normalized_softmax_case(seed, dtype):
    temperature = 0.1
    loss_func = losses.NormSoftmaxLoss(10, 2, temperature=temperature).to(dtype)
    loss, emb, labels, weights = run_case(loss_func, dtype)
    assert torch.isclose(loss, F.cross_entropy((emb @ weights) / temperature, labels), rtol=1e-5)
    assert torch.allclose(loss_func.get_logits(emb).to(dtype), emb @ weights / temperature,
                          rtol=1e-2)


# ---- the same calls through PML itself, where it is installed ----------------------------------

def test_indices_tuple_weights_rows_like_pml(seed):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml = pml_losses.CosFaceLoss(12, 6, margin=0.35, scale=30).double()
    ours = losses.CosFaceLoss(12, 6, margin=0.35, scale=30).double()
    ours.load_pml_weight(pml.W.detach())
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 12, (9,))
    tuples = [(torch.tensor([0, 0, 3]), torch.tensor([1, 5, 5]), torch.tensor([2, 8, 2])),  # triplets
              (torch.tensor([], dtype=torch.long),) * 3]                                     # empty: all 1
    for t in tuples:
        assert torch.allclose(ours(x, y, indices_tuple=t), pml(x, y, indices_tuple=t), rtol=1e-10)
    assert torch.allclose(ours.get_logits(x).double(), pml.get_logits(x), rtol=1e-5, atol=1e-5)


def test_weight_init_func_sees_pml_layout(seed):
    seen = []

    def init(w):
        seen.append(tuple(w.shape))
        torch.nn.init.xavier_uniform_(w)

    loss = losses.ArcFaceLoss(7, 3, weight_init_func=init)
    assert seen == [(3, 7)] and loss.weight.shape == (7, 3) and loss.W.shape == (3, 7)


# ---- traps a PML user must not fall into silently -----------------------------------------------

@pytest.mark.parametrize("make,exc,needle", [
    (lambda: losses.ArcFaceLoss(10, 8, 0.5), TypeError, "positional"),          # PML order swap
    (lambda: losses.ArcFaceLoss(10, 8, margin=28.6), ValueError, "degrees"),     # PML's unit
    (lambda: losses.CosFaceLoss(10, 8, reducer=object()), TypeError, "reducer"),
    (lambda: losses.CosFaceLoss(10, 8, weight_regularizer=object()), TypeError, "weight_regularizer"),
    (lambda: losses.NormSoftmaxLoss(10, 8, embedding_regularizer=object()), TypeError, "embedding_regularizer"),
    (lambda: losses.NormSoftmaxLoss(10, 8, distance=object()), TypeError, "distance"),
    (lambda: losses.NormSoftmaxLoss(10, 8, scale=20, temperature=0.05), ValueError, "temperature"),
    (lambda: losses.NormSoftmaxLoss(10, 8, temperature=0), ValueError, "temperature"),
    (lambda: losses.CosFaceLoss(10, 8, weight_init_func=3), TypeError, "weight_init_func"),
])
def test_pml_traps_are_errors(make, exc, needle):
    with pytest.raises(exc, match=needle):
        make()


def test_defaults_match_pml():
    assert losses.NormSoftmaxLoss(5, 4).kwargs["scale"] == pytest.approx(1 / 0.05)  # PML temperature 0.05
    c = losses.CosFaceLoss(5, 4).kwargs
    assert (c["scale"], c["margin"]) == (64.0, 0.35)
    a = losses.ArcFaceLoss(5, 4).kwargs
    assert a["scale"] == 64.0 and a["margin"] == pytest.approx(math.radians(28.6), abs=1e-3)


def test_assigning_w_is_refused_and_ref_emb_too():
    loss = losses.CosFaceLoss(5, 4)
    with pytest.raises(AttributeError, match="load_pml_weight"):
        loss.W = torch.nn.Parameter(torch.randn(4, 5))
    assert len(list(loss.parameters())) == 1
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, y, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(x, y, indices_tuple=(torch.tensor([0]), torch.tensor([7]), torch.tensor([1])))
