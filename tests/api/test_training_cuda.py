"""Training on a GPU with the pieces a user combines: a validation hook, a baseline whose old
model was left on the CPU, a learned projection queried with CPU embeddings, an AMP resume of a
checkpoint written without AMP, class means of a GPU old model, the contrastive term under AMP.

CUDA only (they run on a GPU lease). Each was a failure found by reading the CUDA-only code
(2026-11-26, no GPU that day); the CPU hides all of them (one device). They take the loss's
default route with fp32 inputs, the epilogue provider once that family is verified (the fused one
takes bf16 only), so they name that family: a default must not be flipped while training with it
fails on the GPU."""
import pytest
import torch
from torch import nn

from bct_fast import losses, train
from bct_fast.compat_monitor import CompatibilityValidator
from test_compat_monitor import clustered

KERNEL_FAMILIES = ("margin_epilogue",)

pytestmark = pytest.mark.cuda


def _data(seed, n_per=8, classes=6, d=10):
    """test_compat_monitor's clustered data, as 16-row batches."""
    x, y = clustered(n_per, classes, d, seed)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)], x, y


def test_fit_on_a_gpu_with_a_validator(seed):
    """The validator embeds where the model is (before: on the CPU, leaving the model there, so
    epoch 2 met CUDA optimizer state with CPU parameters)."""
    loader, _, _ = _data(seed)
    val_loader, xv, _ = _data(seed + 1, n_per=4)
    old = nn.Linear(10, 8)
    with torch.no_grad():
        old_val = old(xv)
    val = CompatibilityValidator(val_loader, old_val)
    model = nn.Linear(10, 8)
    train.fit(model, losses.NormSoftmaxLoss(6, 8, scale=8.0), loader, 3, device="cuda", progress=False,
              validate=val)
    assert [r["epoch"] for r in val.history] == [0, 1, 2]
    assert model.weight.is_cuda


def test_l2_baseline_with_the_old_model_on_the_cpu(seed):
    """train_l2(..., device="cuda") with a CPU old model (before: the old model, not a submodule
    of the objective, stayed on the CPU and met CUDA batches)."""
    loader, _, _ = _data(seed)
    new, objective = train.train_l2(nn.Linear(10, 8), nn.Linear(10, 8), loader, 6, 8, 2, device="cuda",
                                    progress=False)
    assert new.weight.is_cuda and objective.last_terms["l2"] >= 0


def test_learned_projection_maps_cpu_embeddings(seed):
    """A learned projection trained on the GPU maps CPU embeddings (what embed() returns), the
    result on the CPU (before: a device error inside nn.Linear)."""
    old_w = torch.randn(6, 8)
    loss = losses.InfluenceLoss(old_w, projection="learned", new_dim=12).cuda()
    emb = torch.randn(5, 12)
    out = loss.to_old_space(emb)
    assert out.device.type == "cpu"
    with torch.no_grad():
        ref = loss.projection.cpu()(emb)
    assert torch.allclose(out, ref, atol=1e-5)


def test_amp_resume_of_a_checkpoint_written_without_amp(seed, tmp_path):
    """amp=True on a GPU resumes a checkpoint written with amp=False (before: GradScaler refused
    its empty saved state)."""
    loader, _, _ = _data(seed)
    ckpt = tmp_path / "run.ckpt"
    model, loss = nn.Linear(10, 8), losses.NormSoftmaxLoss(6, 8, scale=8.0)
    train.fit(model, loss, loader, 1, device="cuda", checkpoint=ckpt, progress=False)
    train.fit(model, loss, loader, 3, device="cuda", amp=True, checkpoint=ckpt, progress=False)
    assert train.load_checkpoint(ckpt)["epoch"] == 3


def test_class_means_of_a_gpu_old_model_with_a_cpu_weight(seed):
    """synthesize_classifier(old_model.cuda(), loader, cpu_weight, C): the model runs on its GPU,
    the rows come back on the weight's device (before: CPU batches into a CUDA model)."""
    loader, x, y = _data(seed)
    old = nn.Linear(10, 8).cuda()
    w = losses.synthesize_classifier(old, loader, torch.randn(3, 8), 6, progress=False)
    assert w.device.type == "cpu" and w.shape == (6, 8)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(old(x.cuda()).cpu(), dim=1)
    mean5 = torch.nn.functional.normalize(emb[y == 5].mean(0), dim=0)
    assert torch.allclose(w[5], mean5, atol=1e-5)


def test_contrastive_term_is_fp32_under_cuda_autocast(seed):
    """The B x B InfoNCE product stays fp32 inside an fp16 autocast region (the same value as
    outside it; before: fp16 logits, inf once 1/T passed 65504)."""
    g = torch.Generator().manual_seed(seed)
    new, old = torch.randn(64, 16, generator=g).cuda(), torch.randn(64, 16, generator=g).cuda()
    labels = torch.randint(0, 8, (64,), generator=g).cuda()
    term = losses.OldFeatureContrastiveLoss(temperature=0.05)
    ref = term(new, old, labels)
    with torch.autocast("cuda", dtype=torch.float16):
        got = term(new, old, labels)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
