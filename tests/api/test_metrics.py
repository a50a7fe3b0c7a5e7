"""Retrieval metrics from top-k results, cross-checked against pytorch-metric-learning."""
import pytest
import torch

from bct_fast.metrics import evaluate_retrieval, retrieval_metrics
from topk_reference import near_tie_free


def test_hand_computed():
    # gallery labels by rank for two queries of label 1 (relevant items: 2 in the gallery)
    gallery_labels = torch.tensor([1, 0, 1, 0])
    indices = torch.tensor([[0, 1, 2, 3], [1, 3, 0, 2]])
    m = retrieval_metrics(indices, torch.tensor([1, 1]), gallery_labels, recall_at=(1, 3))
    assert m["precision_at_1"] == pytest.approx(0.5)
    assert m["hit_rate_at_3"] == pytest.approx(1.0)   # both queries find a relevant item by rank 3
    assert m["recall_at_3"] == pytest.approx((2 / 2 + 1 / 2) / 2)  # fraction of the 2 relevant found
    # AP q0 = (1/1 + 2/3) / 2; AP q1 = (1/3 + 2/4) / 2
    assert m["mean_average_precision"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


def test_matches_pml_accuracy_calculator(seed):
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    # PML's default kNN is FAISS IndexFlatL2 on raw vectors: same ranking as cosine once normalized.
    # no near-ties: fp32 FAISS and our search could order neighbours ~1e-8 apart either way
    q, _ = near_tie_free(lambda: (torch.nn.functional.normalize(torch.randn(60, 8), dim=1),) * 2, k=59)
    labels = torch.randint(0, 6, (60,))
    ours = evaluate_retrieval(q, labels, k="all")  # leave-one-out, full ranking
    calc = acc_mod.AccuracyCalculator(include=("precision_at_1", "mean_average_precision"), k=59,
                                      device=torch.device("cpu"))
    pml = calc.get_accuracy(q, labels, q, labels, ref_includes_query=True)
    assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["mean_average_precision"] == pytest.approx(pml["mean_average_precision"], abs=1e-5)


def test_gallery_without_labels_is_an_error():
    with pytest.raises(ValueError, match="gallery_labels"):
        evaluate_retrieval(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(7, 4))


@pytest.mark.parametrize("call,error,match", [
    (lambda: evaluate_retrieval(torch.randn(5, 4), torch.zeros(5)), TypeError, "query_labels: expected an integer"),
    (lambda: evaluate_retrieval(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(6, 4),
                                torch.zeros(6, dtype=torch.bool)), TypeError, "gallery_labels: expected an integer"),
    (lambda: evaluate_retrieval(torch.randn(5, 4), [0, 1, 2, 3, 4]), TypeError, "query_labels: expected a torch.Tensor"),
    (lambda: retrieval_metrics(torch.tensor([[0, 3]]), torch.tensor([1]), torch.tensor([1, 0, 1])),
     ValueError, r"indices: gallery rows must be in \[0, 3\)"),
    (lambda: retrieval_metrics(torch.tensor([[0, -1]]), torch.tensor([1]), torch.tensor([1, 0, 1])),
     ValueError, "indices: gallery rows"),
    (lambda: retrieval_metrics(torch.tensor([[0, 1]]), torch.tensor([1, 0]), torch.tensor([1, 0, 1])),
     ValueError, r"query_labels: expected shape \[1\]"),
    (lambda: retrieval_metrics(torch.tensor([0.0, 1.0]), torch.tensor([1]), torch.tensor([1, 0])),
     ValueError, "indices: expected a 2-D integer tensor"),
])
def test_bad_labels_and_indices_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _tm():
    return pytest.importorskip("torchmetrics.functional.retrieval")


def test_full_ranking_metrics_match_torchmetrics(seed):
    """k='all' gives full-ranking mAP / R-precision / hit rate equal to torchmetrics'."""
    tm = _tm()
    # torchmetrics ranks fp32 copies of the scores (ulp 2.4e-7 on [2, 3)): keep every pair of
    # scores of a query > 1e-6 apart so both rankings are the float64 one
    q, g = near_tie_free(lambda: (torch.randn(40, 12, dtype=torch.float64), torch.randn(150, 12, dtype=torch.float64)),
                         k=150)
    ql, gl = torch.randint(0, 6, (40,)), torch.randint(0, 6, (150,))
    ours = evaluate_retrieval(q, ql, g, gl, k="all", recall_at=(1, 5))
    # torchmetrics treats items with a score <= 0 as irrelevant: shift cosines to (1, 3), same ranking
    scores = 2 + torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    rel = gl[None, :] == ql[:, None]
    keep = rel.any(1)
    ap = [tm.retrieval_average_precision(scores[i], rel[i]) for i in range(40) if keep[i]]
    rp = [tm.retrieval_r_precision(scores[i], rel[i]) for i in range(40) if keep[i]]
    hr5 = [tm.retrieval_hit_rate(scores[i], rel[i], top_k=5) for i in range(40) if keep[i]]
    rc5 = [tm.retrieval_recall(scores[i], rel[i], top_k=5) for i in range(40) if keep[i]]
    assert ours["mean_average_precision"] == pytest.approx(float(torch.stack(ap).mean()), abs=1e-6)
    assert ours["r_precision"] == pytest.approx(float(torch.stack(rp).mean()), abs=1e-6)
    assert ours["hit_rate_at_5"] == pytest.approx(float(torch.stack(hr5).mean()), abs=1e-6)
    assert ours["recall_at_5"] == pytest.approx(float(torch.stack(rc5).mean()), abs=1e-6)


def test_truncated_map_and_empty_queries_match_torchmetrics(seed):
    """k < R with torchmetrics' conventions: MAP@k over the hits in the top k
    (ap_normalization='retrieved') and queries without a relevant item counted as 0
    (empty_queries='zero', torchmetrics' empty_target_action='neg')."""
    tm = _tm()
    q, g = near_tie_free(lambda: (torch.randn(30, 10, dtype=torch.float64), torch.randn(120, 10, dtype=torch.float64)),
                         k=120)
    ql, gl = torch.randint(0, 8, (30,)), torch.randint(0, 6, (120,))  # labels 6, 7: empty queries
    assert bool((ql >= 6).any())
    ours = evaluate_retrieval(q, ql, g, gl, k=7, recall_at=(3, 7), empty_queries="zero",
                              ap_normalization="retrieved", include=("mean_average_precision", "hit_rate_at_K",
                                                                     "recall_at_K", "precision_at_1"))
    scores = 2 + torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    rel = gl[None, :] == ql[:, None]
    mean = lambda f: float(torch.stack([f(scores[i], rel[i]) for i in range(30)]).mean())  # noqa: E731
    assert ours["mean_average_precision"] == pytest.approx(mean(lambda s, r: tm.retrieval_average_precision(s, r, top_k=7)), abs=1e-6)
    assert ours["hit_rate_at_3"] == pytest.approx(mean(lambda s, r: tm.retrieval_hit_rate(s, r, top_k=3)), abs=1e-6)
    assert ours["recall_at_7"] == pytest.approx(mean(lambda s, r: tm.retrieval_recall(s, r, top_k=7)), abs=1e-6)
    assert ours["precision_at_1"] == pytest.approx(mean(lambda s, r: tm.retrieval_precision(s, r, top_k=1)), abs=1e-6)
    skipped = evaluate_retrieval(q, ql, g, gl, k=7, recall_at=(3,), include=("hit_rate_at_K",))
    n = int((gl[None, :] == ql[:, None]).any(1).sum())
    assert skipped["hit_rate_at_3"] == pytest.approx(ours["hit_rate_at_3"] * 30 / n, abs=1e-6)
    with pytest.raises(ValueError, match="query_labels: queries .* no relevant"):
        evaluate_retrieval(q, ql, g, gl, k=7, empty_queries="error")
    with pytest.raises(ValueError, match="empty_queries"):
        evaluate_retrieval(q, ql, g, gl, k=7, empty_queries="neg")


def test_auto_k_is_exact_for_r_metrics_and_recall(seed):
    q = torch.randn(120, 6)
    labels = torch.randint(0, 9, (120,))
    auto = evaluate_retrieval(q, labels)
    full = evaluate_retrieval(q, labels, k="all")
    for name in ("precision_at_1", "hit_rate_at_5", "hit_rate_at_10", "recall_at_5", "r_precision",
                 "mean_average_precision_at_r"):
        assert auto[name] == pytest.approx(full[name], abs=1e-7), name


def test_r_metrics_need_enough_neighbours():
    from bct_fast.metrics import cmc_curve
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    idx = torch.tensor([[4, 1], [0, 2], [3, 5], [2, 0], [0, 5], [4, 1]])  # rows 0 and 4 miss at rank 1
    with pytest.raises(ValueError, match="k=2 < max R=3"):
        retrieval_metrics(idx, labels, labels, exclude_self=True, include=("r_precision",))
    m = retrieval_metrics(idx, labels, labels, exclude_self=True)
    assert "r_precision" not in m and m["precision_at_1"] == pytest.approx(4 / 6)
    assert cmc_curve(idx, labels, labels, exclude_self=True).tolist() == pytest.approx([4 / 6, 1.0])
    with pytest.raises(ValueError, match="include"):
        retrieval_metrics(idx, labels, labels, include=("top1",))


def test_lone_queries_are_left_out_as_in_pml():
    gallery_labels = torch.tensor([1, 1, 2])
    m = retrieval_metrics(torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.tensor([1, 5]), gallery_labels)
    assert m["precision_at_1"] == 1.0 and m["mean_average_precision"] == 1.0


def test_tar_at_far_matches_torchmetrics_roc(seed):
    roc = pytest.importorskip("torchmetrics.functional.classification").binary_roc
    from bct_fast.metrics import tar_at_far
    same = torch.rand(5000) < 0.3
    scores = torch.randn(5000) + 1.5 * same
    ours = tar_at_far(scores, same, fars=(1e-3, 1e-2, 0.1))
    fpr, tpr, _ = roc(scores, same.long(), thresholds=None)
    for far in (1e-3, 1e-2, 0.1):
        best = float(tpr[fpr <= far + 1e-12].max())
        assert ours[f"tar_at_far_{far:.0e}"] == pytest.approx(best, abs=1e-6)  # torchmetrics: fp32 rates


def test_tar_at_far_edge_cases():
    from bct_fast.metrics import pair_scores, tar_at_far
    assert tar_at_far(torch.tensor([0.9, 0.1]), torch.tensor([True, False]), fars=(1.0,))["tar_at_far_1e+00"] == 1.0
    with pytest.raises(ValueError, match="is_same"):
        tar_at_far(torch.tensor([0.9, 0.8]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="scores"):
        tar_at_far(torch.tensor([float("nan"), 0.8]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="b"):
        pair_scores(torch.randn(3, 4), torch.randn(3, 5))
    a = torch.randn(3, 4)
    assert torch.allclose(pair_scores(a, 2 * a), torch.ones(3, dtype=torch.float64))
