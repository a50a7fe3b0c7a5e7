"""Retrieval metrics from top-k results, cross-checked against pytorch-metric-learning."""
import pytest
import torch

from bct_fast.metrics import evaluate_retrieval, retrieval_metrics


def test_hand_computed():
    # gallery labels by rank for two queries of label 1 (relevant items: 2 in the gallery)
    gallery_labels = torch.tensor([1, 0, 1, 0])
    indices = torch.tensor([[0, 1, 2, 3], [1, 3, 0, 2]])
    m = retrieval_metrics(indices, torch.tensor([1, 1]), gallery_labels, recall_at=(1, 3))
    assert m["precision_at_1"] == pytest.approx(0.5)
    assert m["recall_at_3"] == pytest.approx(1.0)
    # AP q0 = (1/1 + 2/3) / 2; AP q1 = (1/3 + 2/4) / 2
    assert m["mean_average_precision"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3 + 2 / 4) / 2) / 2)


def test_matches_pml_accuracy_calculator(seed):
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    # PML's default kNN is FAISS IndexFlatL2 on raw vectors: same ranking as cosine once normalized.
    q = torch.nn.functional.normalize(torch.randn(60, 8), dim=1)
    labels = torch.randint(0, 6, (60,))
    ours = evaluate_retrieval(q, labels)  # leave-one-out, full ranking
    calc = acc_mod.AccuracyCalculator(include=("precision_at_1", "mean_average_precision"), k=59,
                                      device=torch.device("cpu"))
    pml = calc.get_accuracy(q, labels, q, labels, ref_includes_query=True)
    assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["mean_average_precision"] == pytest.approx(pml["mean_average_precision"], abs=1e-5)


def test_gallery_without_labels_is_an_error():
    with pytest.raises(ValueError, match="gallery_labels"):
        evaluate_retrieval(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.randn(7, 4))
