"""train.fit / embed / checkpoints / BCT and baselines on tiny data."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bct_fast import losses, train


def tiny_data(n_classes=6, per=20, dim=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 2
    y = torch.arange(n_classes).repeat_interleave(per)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True), x, y


def mlp(dim=10, out=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, out))


def test_fit_learns_and_returns_eval_mode():
    loader, x, y = tiny_data()
    model, loss = mlp(), losses.NormSoftmaxLoss(6, 8, scale=10)
    history = []
    train.fit(model, loss, loader, 8, progress=False, on_epoch_end=lambda e, v: history.append(v))
    assert not model.training and history[-1] < 0.5 * history[0]


def test_resume_equals_uninterrupted_run(tmp_path):
    loader, _, _ = tiny_data()

    def run(epochs, ckpt):
        model, loss = mlp(seed=3), losses.NormSoftmaxLoss(6, 8, scale=10)
        torch.manual_seed(3)
        loss.weight.data = torch.randn_like(loss.weight)
        train.fit(model, loss, loader, epochs, checkpoint=ckpt, seed=7, progress=False)
        return model, loss

    straight, _ = run(5, None)
    ckpt = tmp_path / "run.ckpt"
    run(2, ckpt)                    # "interrupted" after 2 epochs
    resumed, _ = run(5, ckpt)       # a new process would start from fresh objects like this
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert train.load_checkpoint(ckpt)["epoch"] == 5


def test_corrupted_or_truncated_checkpoint_is_reported(tmp_path):
    path = train.save_checkpoint(tmp_path / "c.ckpt", {"epoch": 1, "w": torch.ones(3)})
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(train.CheckpointError, match="truncated"):
        train.load_checkpoint(path)
    bad = bytearray(data)
    bad[-3] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(train.CheckpointError, match="checksum"):
        train.load_checkpoint(path)
    path.write_bytes(b"garbage" * 3)
    with pytest.raises(train.CheckpointError, match="magic"):
        train.load_checkpoint(path)


class _Opaque:
    pass


@pytest.mark.parametrize("bad,where", [
    ({"epoch": 1, "extra": {"arr": [1, np.ones(2)]}}, r"state\['extra'\]\['arr'\]\[1\] \(numpy.ndarray\)"),
    ({"path": Path("x")}, r"state\['path'\]"),
    ({"obj": _Opaque()}, r"state\['obj'\] \(.*_Opaque\)"),
])
def test_checkpoint_refuses_at_save_what_load_would_refuse(tmp_path, bad, where):
    path = tmp_path / "c.ckpt"
    with pytest.raises(TypeError, match=where):
        train.save_checkpoint(path, bad)
    assert list(tmp_path.iterdir()) == []  # nothing written
    fine = {"epoch": 1, "w": torch.ones(3), "sizes": torch.Size([2]), "dtype": torch.float16,
            "nested": {"t": (1, 2.5, "s", None, b"raw"), "l": [torch.zeros(2, dtype=torch.int64)]}}
    back = train.load_checkpoint(train.save_checkpoint(path, fine))
    assert back["sizes"] == torch.Size([2]) and back["nested"]["t"] == (1, 2.5, "s", None, b"raw")


def test_embed_and_errors():
    loader, x, y = tiny_data()
    model = mlp()
    emb, labels = train.embed(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7))
    assert emb.shape == (len(y), 8) and torch.equal(labels, y)
    assert torch.allclose(emb, model(x), atol=1e-6)
    with pytest.raises(ValueError, match="loader"):
        train.embed(model, [])
    with pytest.raises(ValueError, match="epochs"):
        train.fit(model, losses.NormSoftmaxLoss(6, 8), loader, -1)
    with pytest.raises(ValueError, match="loader: yielded no batches"):
        train.fit(model, losses.NormSoftmaxLoss(6, 8), [], 1, progress=False)
    with pytest.raises(ValueError, match="device: not a torch device"):
        train.fit(model, losses.NormSoftmaxLoss(6, 8), loader, 1, device="tpu0", progress=False)
    with pytest.raises(ValueError, match="device: not a torch device"):
        train.embed(model, loader, device=3.5)


def test_bct_and_baselines_train_and_freeze_the_old_model():
    loader, x, y = tiny_data()
    old_loader = [(xb[yb < 3], yb[yb < 3]) for xb, yb in loader]
    old, old_loss = train.train_independent(mlp(seed=1), old_loader, 3, 8, 3, progress=False)
    before = [p.clone() for p in old.parameters()]
    new, bct = train.train_bct(mlp(seed=2), old, old_loss.weight, loader, 6, 8, 3, progress=False)
    assert bct.influence_loss.old_weight.shape == (6, 8)  # 3 old rows + 3 synthesized
    assert isinstance(bct, losses.BCTLoss) and set(bct.last_terms) == {"new", "influence", "total"}
    l2_model, l2 = train.train_l2(mlp(seed=2), old, loader, 6, 8, 2, progress=False)
    assert set(l2.last_terms) == {"classification", "l2"}
    assert all(torch.equal(a, b) for a, b in zip(before, old.parameters()))
    _, no_synth = train.train_bct(mlp(seed=2), old, old_loss.weight, loader, 6, 8, 1, synthesize=False, progress=False)
    assert no_synth.influence_loss.old_weight.shape == (3, 8)
    _, means = train.train_bct(mlp(seed=2), old, None, loader, 6, 8, 1, class_means=True, progress=False)
    assert torch.allclose(means.influence_loss.old_weight,
                          losses.class_mean_classifier(old, loader, 6, progress=False))
    with pytest.raises(ValueError, match="old_classifier"):
        train.train_bct(mlp(seed=2), old, old_loss.weight, loader, 6, 8, 1, class_means=True, progress=False)
    with pytest.raises(ValueError, match="old_classifier"):
        train.train_bct(mlp(seed=2), old, None, loader, 6, 8, 1, progress=False)
