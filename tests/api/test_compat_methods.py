"""Methods beyond the 2020 recipe: the HOC contrastive term, the learned cross-term projection
(new wider than old), and FCT's gallery transformation; each against an independent
float64 computation or a property that fails when the method is wrong."""
import math

import pytest
import torch
from torch import nn

from bct_fast import cli, losses, train, transformation
from bct_fast.demo import ALL_METHODS, DemoConfig, Upgrade, _cross_test, _same, quick_config, run_demo
from bct_fast.evaluate import cross_test

from test_train import mlp, tiny_data


def _info_nce_reference(new, old, labels, temperature):
    """Float64, one row at a time: -log( e^{s_ii} / (e^{s_ii} + sum_{j: y_j != y_i} e^{s_ij}) )."""
    new = nn.functional.normalize(new.double(), dim=1)
    old = nn.functional.normalize(old.double(), dim=1)
    total = 0.0
    for i in range(len(labels)):
        s = (new[i] @ old.T) / temperature
        keep = [j for j in range(len(labels)) if j == i or labels[j] != labels[i]]
        total += -(s[i] - torch.logsumexp(s[keep], 0)).item()
    return total / len(labels)


def _masked_logits(new, old, labels, temperature):
    """Float64 logits of the loss, same-class other images set to -inf (an independent build)."""
    s = nn.functional.normalize(new.double(), dim=1) @ nn.functional.normalize(old.double(), dim=1).T / temperature
    n = len(labels)
    return s.masked_fill((labels[:, None] == labels[None, :]) & ~torch.eye(n, dtype=torch.bool), -math.inf)


@pytest.mark.parametrize("n,d_new,d_old", [(1, 5, 5), (7, 6, 6), (13, 9, 4)])
def test_contrastive_loss_matches_float64_reference(n, d_new, d_old):
    g = torch.Generator().manual_seed(n)
    new, old = torch.randn(n, d_new, generator=g), torch.randn(n, d_old, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    loss = losses.OldFeatureContrastiveLoss(temperature=0.1)(new, old, labels)
    ref = _info_nce_reference(new[:, :d_old], old, labels, 0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_contrastive_loss_masks_same_class_and_gradients_match():
    g = torch.Generator().manual_seed(1)
    new = torch.randn(6, 4, generator=g, dtype=torch.float64)
    old = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    f = losses.OldFeatureContrastiveLoss(temperature=0.2)
    base = f(new.float(), old, labels)
    # Row 0 (class 0): old[1] (class 0, another image) is neither positive nor negative, so
    # moving it leaves row 0's term unchanged; old[2] (class 1) is a negative and matters.
    def row0(o):
        return -(nn.functional.log_softmax(_masked_logits(new, o, labels, 0.2)[0], 0)[0]).item()
    moved = old.clone()
    moved[1] = torch.randn(4, generator=g)
    assert row0(moved) == pytest.approx(row0(old), rel=1e-12)
    moved[2] = -moved[2]
    assert row0(moved) != pytest.approx(row0(old), rel=1e-6)
    assert f(new.float(), moved, labels).item() != pytest.approx(base.item(), rel=1e-6)
    # gradient w.r.t. the new embeddings equals the float64 autograd gradient
    x = new.clone().requires_grad_(True)
    nn.functional.cross_entropy(_masked_logits(x, old, labels, 0.2), torch.arange(6)).backward()
    y = new.float().requires_grad_(True)
    f(y, old, labels).backward()
    torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,match", [(dict(temperature=0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                                       (dict(temperature=True), "temperature")])
def test_contrastive_loss_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        losses.OldFeatureContrastiveLoss(**bad)


def test_contrastive_loss_bad_inputs():
    f = losses.OldFeatureContrastiveLoss()
    with pytest.raises(ValueError, match="old_embeddings"):
        f(torch.randn(3, 4), torch.randn(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="new_embeddings"):
        f(torch.tensor([[float("nan"), 1.0]]), torch.randn(1, 2), torch.arange(1))


def test_learned_projection_starts_as_the_slice_and_trains():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=g)
    x = torch.randn(9, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (9,), generator=g)
    sliced = losses.InfluenceLoss(w, scale=10)
    learned = losses.InfluenceLoss(w, scale=10, projection="learned", new_dim=7)
    assert learned(x, y).item() == pytest.approx(sliced(x, y).item(), rel=1e-6)
    torch.testing.assert_close(learned.to_old_space(x), x[:, :4])
    learned(x, y).backward()
    assert learned.projection.weight.grad is not None and learned.projection.weight.grad.abs().sum() > 0
    assert list(learned.parameters()) == [learned.projection.weight]  # the old classifier stays frozen
    assert not list(sliced.parameters())


@pytest.mark.parametrize("kw,match", [(dict(projection="pca"), "projection"), (dict(projection="learned"), "new_dim"),
                                      (dict(projection="learned", new_dim=0), "new_dim")])
def test_projection_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        losses.InfluenceLoss(torch.randn(3, 4), **kw)


def test_projection_wrong_width_is_named():
    f = losses.InfluenceLoss(torch.randn(3, 4), projection="learned", new_dim=6)
    with pytest.raises(ValueError, match="embeddings: dim 5"):
        f.to_old_space(torch.randn(2, 5))


def test_train_contrastive_and_projection_make_wide_models_compatible():
    """A wider new model (12 dims vs 8) trained with the contrastive term (and with class-mean
    BCT through a learned projection) retrieves old embeddings far better than one trained alone."""
    loader, x, y = tiny_data()
    old, old_loss = train.train_independent(mlp(out=8, seed=1), loader, 6, 8, 10, scale=10, progress=False)
    old_e = old(x).detach()

    def cross(model, objective):
        q = objective.to_old_space(model(x).detach()) if objective is not None else model(x).detach()[:, :8]
        return cross_test(old_e, q.detach(), y).new_old["precision_at_1"]

    indep, _ = train.train_independent(mlp(out=12, seed=2), loader, 6, 12, 10, scale=10, progress=False)
    hoc, hoc_obj = train.train_contrastive(mlp(out=12, seed=2), old, loader, 6, 12, 10, scale=10,
                                           temperature=0.1, progress=False)
    proj, proj_obj = train.train_bct(mlp(out=12, seed=2), old, None, loader, 6, 12, 10, class_means=True,
                                     projection="learned", scale=10, progress=False)
    assert set(hoc_obj.last_terms) == {"classification", "contrastive"}
    assert not any(p.requires_grad for p in old.parameters())
    base = cross(indep, None)
    assert cross(hoc, hoc_obj) > base + 0.3
    assert cross(proj, proj_obj.influence_loss) > base + 0.3


def test_transformation_learns_a_hidden_map_and_counts_flops():
    """New embeddings = a fixed random rotation of the old ones (+ a dim): the trained FCT
    transformation must recover it (cosine > 0.95 on unseen rows); an untrained one does not."""
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(10, 6))
    rot = torch.linalg.qr(torch.randn(7, 7))[0][:, :6]  # 6 -> 7 dims, orthonormal columns

    class New(nn.Module):
        def forward(self, x):
            return nn.functional.normalize(old(x), dim=1) @ rot.T
    new = New()
    new.register_parameter("dummy", nn.Parameter(torch.zeros(1)))
    x = torch.randn(600, 10)
    y = torch.randint(0, 4, (600,))
    loader = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 600, 100)]
    h = transformation.EmbeddingTransformation(6, 7, hidden=64)
    x_test = torch.randn(200, 10)
    with torch.no_grad():
        target = new(x_test)
        before = nn.functional.cosine_similarity(transformation.upgrade_gallery(h, old(x_test)), target).mean()
    transformation.train_transformation(h, old, new, None, loader, 60, lr=3e-3, progress=False)
    with torch.no_grad():
        up = transformation.upgrade_gallery(h, old(x_test), batch_size=37)  # odd batches
        after = nn.functional.cosine_similarity(up, target).mean()
        torch.testing.assert_close(up, h(old(x_test)))
    assert after > 0.95 and before < 0.8
    cost = transformation.transformation_cost(h, nn.Sequential(nn.Linear(10, 6)), x[0])
    # two Linear layers without bias terms counted: 2*6*64 + 2*64*64 + 2*64*7 multiply-adds x 2
    assert cost["transform_flops"] == 2 * (6 * 64 + 64 * 64 + 64 * 7)
    assert cost["reembed_flops"] == 2 * 10 * 6


def test_transformation_errors():
    with pytest.raises(ValueError, match="old_dim"):
        transformation.EmbeddingTransformation(0, 4)
    h = transformation.EmbeddingTransformation(3, 4)
    with pytest.raises(ValueError, match="old_embeddings"):
        h(torch.randn(2, 5))
    lin3, lin5 = nn.Linear(2, 3), nn.Linear(2, 5)
    loader = [(torch.randn(4, 2), torch.arange(4))]
    with pytest.raises(ValueError, match="transformation: maps 3 -> 4"):
        transformation.train_transformation(h, lin3, lin5, None, loader, 1, progress=False)

    class Shuffled:
        def __iter__(self):
            perm = torch.randperm(8)
            yield torch.randn(8, 2), perm
    with pytest.raises(ValueError, match="loader"):
        transformation.train_transformation(transformation.EmbeddingTransformation(3, 5), lin3, lin5, None,
                                            Shuffled(), 1, progress=False)


def test_demo_cross_test_with_identity_maps_equals_cross_test():
    g = torch.Generator().manual_seed(3)
    old_e, new_e = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    is_query = torch.arange(30) % 3 == 0
    up = Upgrade(nn.Identity(), _same, _same, {})
    for mask in (None, is_query):
        mine = _cross_test(old_e, new_e, labels, mask, up)
        if mask is None:
            ref = cross_test(old_e, new_e, labels, k="all")
        else:
            ref = cross_test(old_e[mask], new_e[mask], labels[mask], old_gallery=old_e[~mask],
                             new_gallery=new_e[~mask], gallery_labels=labels[~mask], k="all")
        assert (mine.old_old, mine.new_new, mine.new_old) == (ref.old_old, ref.new_new, ref.new_old)


def test_demo_runs_the_new_methods_with_a_wider_new_model():
    pytest.importorskip("sklearn")
    cfg = quick_config("digits")
    cfg.methods = ("fct", "hoc", "bct_class_means_projection")
    cfg.new_embed_dim, cfg.new_epochs, cfg.transformation_epochs = 48, 3, 3
    r = run_demo(cfg, progress=False)
    m = r["open_set"]["methods"]
    assert set(m) == set(cfg.methods) and "training_curves" not in r
    cost = m["fct"]["cost_per_item"]
    # (for this tiny MLP the transformation costs more than re-embedding: only counted, not assumed)
    assert cost["transform_flops"] > 0 and cost["reembed_flops"] > 0
    assert cost["reembed_over_transform"] == pytest.approx(cost["reembed_flops"] / cost["transform_flops"])
    for name in cfg.methods:
        assert 0 <= m[name]["new/old"]["precision_at_1"] <= 1


def test_demo_and_cli_refuse_unknown_methods(capsys):
    cfg = DemoConfig(dataset="digits", methods=("bct", "magic"))
    with pytest.raises(ValueError, match="methods"):
        run_demo(cfg, progress=False)
    assert cli.main(["demo", "--dataset", "digits", "--methods", "magic", "--no-progress", "--out", "/nonexistent/x"]) == 2
    assert "methods" in capsys.readouterr().err
    assert "fct" in ALL_METHODS


@pytest.mark.parametrize("seed", [0, 3])
def test_cjk_families_protocol_keeps_designs_disjoint(monkeypatch, seed):
    """protocol='families' on CJK (fonts not installed in CI: a stand-in dataset whose every
    image carries its design index): training, query and gallery designs are disjoint groups."""
    from bct_fast import data as datasets
    from bct_fast.demo import default_config, load_data

    n_chars, n_fonts, aug = 30, 13, 1

    def fake(size, augment=0, seed=0, progress=True, max_classes=None):
        y = torch.arange(n_chars).repeat_interleave(n_fonts * (augment + 1))
        font = torch.arange(n_fonts).repeat_interleave(augment + 1).repeat(n_chars)
        x = torch.zeros(len(y), 1, size, size)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = font.float(), y.float()
        return x, y, font, [str(i) for i in range(n_chars)]
    monkeypatch.setattr(datasets, "cjk_glyph_dataset", fake)
    cfg = default_config("cjk")
    cfg.protocol, cfg.seed, cfg.augment, cfg.old_classes, cfg.train_classes = "families", seed, aug, 5, 20
    d = load_data(cfg)
    design = lambda x: set(x[:, 0, 0, 0].long().tolist())  # noqa: E731
    train = design(d.train_x)
    assert train == {f for f in range(n_fonts) if f % 4 not in ((2 + seed) % 4, (3 + seed) % 4)}
    for name, (xe, _, is_query) in d.eval_sets.items():
        q, g = design(xe[is_query]), design(xe[~is_query])
        assert q == {f for f in range(n_fonts) if f % 4 == (2 + seed) % 4}, name
        assert g == {f for f in range(n_fonts) if f % 4 == (3 + seed) % 4}, name
        assert not (q | g) & train
