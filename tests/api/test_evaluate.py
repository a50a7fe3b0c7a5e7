"""cross_test and compatibility_matrix on constructed embeddings with known answers."""
import json

import pytest
import torch

from bct_fast.evaluate import CompatibilityMatrix, compatibility_matrix, cross_test


def clustered(n_classes=20, per=6, dim=16, noise=0.3):
    centers = torch.nn.functional.normalize(torch.randn(n_classes, dim), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per)
    return centers, labels, centers[labels] + noise * torch.randn(len(labels), dim)


def test_compatible_update_passes_the_criterion(seed):
    centers, labels, old = clustered(noise=0.6)
    new = centers[labels] + 0.2 * torch.randn_like(old)  # same space, tighter clusters
    r = cross_test(old, new, labels)
    assert r.new_new["precision_at_1"] >= r.old_old["precision_at_1"]
    assert r.compatible and r.update_gain > 0
    assert "new/old" in r.table() and json.dumps(r.to_dict())


def test_independent_model_fails_the_criterion(seed):
    _, labels, old = clustered()
    rot = torch.linalg.qr(torch.randn(16, 16)).Q
    new = old @ rot  # as good as old on its own, but in a rotated space
    r = cross_test(old, new, labels)
    # equal up to one query: a rotation moves scores by ~1e-7, which may flip a rank-1 near-tie
    assert r.new_new["precision_at_1"] == pytest.approx(r.old_old["precision_at_1"], abs=1.01 / len(labels))
    assert not r.compatible and r.new_old["precision_at_1"] < 0.5 * r.old_old["precision_at_1"]


def test_cross_test_with_separate_gallery_and_errors(seed):
    _, labels, old = clustered(noise=0.1)  # well-separated clusters: retrieval is easy
    new = old + 0.01 * torch.randn_like(old)
    qi, gi = torch.arange(0, 120, 3), torch.cat([torch.arange(1, 120, 3), torch.arange(2, 120, 3)])
    r = cross_test(old[qi], new[qi], labels[qi], old_gallery=old[gi], new_gallery=new[gi],
                   gallery_labels=labels[gi])
    assert r.old_old["precision_at_1"] > 0.5
    with pytest.raises(ValueError, match="give all three"):
        cross_test(old, new, labels, old_gallery=old)
    with pytest.raises(ValueError, match="new_query"):
        cross_test(old, new[:5], labels)
    with pytest.raises(ValueError, match="metric"):
        cross_test(old, new, labels, metric="top1")


def test_cross_test_maps_apply_to_the_cross_pair_only(seed):
    """query_map / gallery_map change only new/old: a wider new model sliced to the old size, and
    a rotated new space met by rotating the stored old gallery (FCT's case)."""
    from bct_fast.metrics import evaluate_retrieval

    centers, labels, old = clustered(noise=0.2)
    wide = torch.cat([centers[labels] + 0.1 * torch.randn_like(old), torch.randn(len(labels), 8)], 1)
    with pytest.raises(ValueError, match="new_query: dim 24 != old dim 16.*query_map"):
        cross_test(old, wide, labels)
    r = cross_test(old, wide, labels, query_map=lambda e: e[:, :16])
    assert r.new_new == evaluate_retrieval(wide, labels, wide, labels, k="auto", exclude_self=True)
    assert r.new_old == evaluate_retrieval(wide[:, :16], labels, old, labels, k="auto", exclude_self=True)
    assert r.compatible

    rot = torch.linalg.qr(torch.randn(16, 16)).Q
    new = old @ rot
    plain = cross_test(old, new, labels)
    mapped = cross_test(old, new, labels, gallery_map=lambda g: g @ rot)
    assert mapped.old_old == plain.old_old and mapped.new_new == plain.new_new
    assert mapped.new_old["precision_at_1"] > plain.new_old["precision_at_1"] + 0.3

    with pytest.raises(ValueError, match="query_map, gallery_map: the mapped new queries have dim 24"):
        cross_test(old, wide, labels, gallery_map=lambda g: g)
    with pytest.raises(ValueError, match=r"query_map: must return a \[120, dim\] matrix"):
        cross_test(old, wide, labels, query_map=lambda e: e[:5, :16])
    with pytest.raises(TypeError, match="gallery_map: expected a callable"):
        cross_test(old, new, labels, gallery_map="rotate")


def test_compatibility_matrix_ac_am_table_and_heatmap(seed, tmp_path):
    pytest.importorskip("matplotlib")
    centers, labels, m0 = clustered(n_classes=40, noise=0.4)
    m1 = centers[labels] + 0.1 * torch.randn_like(m0)  # same space, much tighter: compatible
    m2 = (centers[labels] + 0.1 * torch.randn_like(m0)) @ torch.linalg.qr(torch.randn(16, 16)).Q
    cm = compatibility_matrix({"v0": m0, "v1": m1, "v2": m2}, labels)
    v = cm.values
    assert len(v) == 3 and all(len(row) == 3 for row in v)
    expected_ac = sum(v[i][j] > v[j][j] for i, j in ((1, 0), (2, 0), (2, 1))) / 3
    assert cm.ac == pytest.approx(expected_ac)
    assert v[1][0] > v[0][0] and v[2][0] < v[0][0]  # v1 compatible with v0, the rotated v2 not
    assert cm.am == pytest.approx(sum(v[i][j] for i in range(3) for j in range(i + 1)) / 6)
    assert "AC =" in cm.table()
    png = cm.plot(tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(cm.save_json(tmp_path / "m.json").read_text())
    assert data["AC"] == pytest.approx(cm.ac)
    lower = compatibility_matrix({"v0": m0, "v1": m1}, labels, lower_only=True)
    assert lower.values[0][1] is None and lower.ac == pytest.approx(float(v[1][0] > v[0][0]))


def test_hand_made_matrix_summaries():
    cm = CompatibilityMatrix(["a", "b", "c"], [[0.5, None, None], [0.6, 0.7, None], [0.4, 0.8, 0.9]], "p@1")
    assert cm.ac == pytest.approx(2 / 3)  # (b,a) and (c,b) pass, (c,a) fails
    assert cm.am == pytest.approx((0.5 + 0.6 + 0.7 + 0.4 + 0.8 + 0.9) / 6)


def test_compatibility_matrix_input_errors_name_the_model(seed):
    _, labels, old = clustered()
    with pytest.raises(TypeError, match="embeddings: expected a mapping"):
        compatibility_matrix([old], labels)
    with pytest.raises(ValueError, match="embeddings: needs at least one model"):
        compatibility_matrix({}, labels)
    with pytest.raises(ValueError, match=r"embeddings\['v2'\]: expected a \[120, dim\]"):
        compatibility_matrix({"v1": old, "v2": old[:-1]}, labels)
    with pytest.raises(ValueError, match="gallery_labels: required"):
        compatibility_matrix({"v1": old}, labels, gallery_embeddings={"v1": old})
    with pytest.raises(ValueError, match="same models in the same order"):
        compatibility_matrix({"v1": old, "v2": old}, labels, gallery_embeddings={"v2": old, "v1": old},
                             gallery_labels=labels)
