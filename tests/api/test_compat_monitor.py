"""Compatibility-aware training: the validator's records, the stated rule, restoring the chosen epoch."""
import pytest
import torch

from bct_fast import losses, train
from bct_fast.compat_monitor import CompatibilityValidator, choose_epoch
from bct_fast.evaluate import cross_test


def test_the_rule():
    h = [dict(epoch=0, new_new=0.80, new_old=0.50), dict(epoch=1, new_new=0.90, new_old=0.40),
         dict(epoch=2, new_new=0.89, new_old=0.45), dict(epoch=3, new_new=0.70, new_old=0.70)]
    assert choose_epoch(h, 0.02)["epoch"] == 2   # best new/old among new/new >= 0.88
    assert choose_epoch(h, 0.0)["epoch"] == 1
    assert choose_epoch(h, 0.25)["epoch"] == 3
    with pytest.raises(ValueError, match="history"):
        choose_epoch([], 0.1)
    tie = [dict(epoch=0, new_new=0.8, new_old=0.5), dict(epoch=1, new_new=0.9, new_old=0.5),
           dict(epoch=2, new_new=0.9, new_old=0.5)]
    assert choose_epoch(tie, 0.2)["epoch"] == 1  # equal new/old: the higher new/new, then the earlier


def test_every_choice_the_rule_can_make_keeps_its_state():
    """Regression: with a tie in new/old a pruned (dominated) epoch could be chosen (KeyError)."""
    import itertools

    model = torch.nn.Linear(2, 2)
    values = [0.5, 0.6, 0.7]
    for seq in itertools.product(values, repeat=3):
        val = CompatibilityValidator([], torch.randn(3, 4))
        for e, (nn_, no) in enumerate(zip(seq, reversed(seq))):
            rec = dict(epoch=e, new_new=nn_, new_old=no, old_old=0.5, compatible=False)
            val.history.append(rec)
            val._keep_state(rec, model)
        for tol in (0.0, 0.1, 0.3):
            assert choose_epoch(val.history, tol)["epoch"] in val._states


def clustered(n_per, classes, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + 0.5 * torch.randn(len(y), d, generator=g), y


def test_fit_validates_every_epoch_and_restores_the_chosen_state(tmp_path):
    x, y = clustered(8, 6, 10, 0)
    xv, yv = clustered(4, 6, 10, 1)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(y), 16)]
    val_loader = [(xv, yv)]
    old = torch.nn.Linear(10, 8)
    with torch.no_grad():
        old_val = old(xv)
    val = CompatibilityValidator(val_loader, old_val, new_new_tolerance=0.05)
    model = torch.nn.Linear(10, 8)
    train.fit(model, losses.NormSoftmaxLoss(6, 8, scale=8.0), loader, 4, progress=False, validate=val)
    assert [r["epoch"] for r in val.history] == [0, 1, 2, 3]
    chosen = val.chosen
    with torch.no_grad():
        r = cross_test(old_val, model(xv), yv)  # the restored model reproduces the chosen record
    assert r.new_new["precision_at_1"] == pytest.approx(chosen["new_new"])
    assert r.new_old["precision_at_1"] == pytest.approx(chosen["new_old"])
    assert val.plot(tmp_path / "curves.png").stat().st_size > 1000
    assert len(val._states) <= len(val.history)  # only the Pareto front is kept


def test_validator_arguments():
    with pytest.raises(ValueError, match="gallery_loader, old_gallery"):
        CompatibilityValidator([], torch.randn(3, 4), old_gallery=torch.randn(3, 4))
    with pytest.raises(ValueError, match="new_new_tolerance"):
        CompatibilityValidator([], torch.randn(3, 4), new_new_tolerance=2)
    with pytest.raises(ValueError, match="old_queries"):
        CompatibilityValidator([], torch.randn(3))
