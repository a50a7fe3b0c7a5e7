"""The search API: PML's knn_func contract, and the public import paths users rely on."""
import importlib

import pytest
import torch

from topk_reference import near_tie_free


def test_knn_func_in_pml_accuracy_calculator(seed):
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from bct_fast.search import KnnFunc

    # fp32 may order neighbours ~1e-8 apart either way and a swap across labels moves the metrics
    # by ~1e-6; this test is about the PML interface (the tie tests in tests/ops cover ties)
    ref, _ = near_tie_free(lambda: (torch.randn(300, 16),) * 2, k=60, n_queries=80)
    ref_labels = torch.randint(0, 10, (300,))
    q, q_labels = ref[:80], ref_labels[:80]
    metrics = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_average_precision")
    ours = acc_mod.AccuracyCalculator(include=metrics, knn_func=KnnFunc(), k=60)
    # PML's own exact cosine kNN as the peer
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN
    peer = acc_mod.AccuracyCalculator(include=metrics, knn_func=CustomKNN(CosineSimilarity()), k=60)
    for ref_includes_query in (False, True):
        a = ours.get_accuracy(q, q_labels, ref, ref_labels, ref_includes_query=ref_includes_query)
        b = peer.get_accuracy(q, q_labels, ref, ref_labels, ref_includes_query=ref_includes_query)
        for name in metrics:
            assert a[name] == pytest.approx(b[name], abs=1e-6), (name, ref_includes_query)


# Import paths of the README and of earlier releases -> the object they must name.
PUBLIC_NAMES = [
    ("bct_fast.ops", "cosine_margin_cross_entropy", "bct_fast.ops.margin_softmax"),
    ("bct_fast.ops", "CosineMarginCrossEntropyFunction", "bct_fast.ops.margin_softmax"),
    ("bct_fast.search", "cosine_topk", "bct_fast.ops.topk"),
    ("bct_fast.search", "GalleryIndex", "bct_fast.gallery"),
    ("bct_fast.search", "KnnFunc", "bct_fast.search"),
    ("bct_fast.gallery", "GalleryIndex", "bct_fast.gallery"),
    ("bct_fast.margins", "make_margin", "bct_fast.ops.margins"),
    ("bct_fast.margins", "Margin", "bct_fast.ops.margins"),
    ("bct_fast.losses", "ArcFaceLoss", "bct_fast.losses"),
    ("bct_fast.metrics", "evaluate_retrieval", "bct_fast.metrics"),
    ("bct_fast.metrics", "tar_at_far", "bct_fast.metrics"),
    ("bct_fast.evaluate", "cross_test", "bct_fast.evaluate"),
    ("bct_fast.evaluate", "compatibility_matrix", "bct_fast.evaluate"),
    ("bct_fast.distributed", "ShardedCosineMarginLoss", "bct_fast.distributed"),
    ("bct_fast.train", "train_bct", "bct_fast.train"),
    ("bct_fast", "cosine_margin_cross_entropy", "bct_fast.ops.margin_softmax"),
]


@pytest.mark.parametrize("module,name,defined_in", PUBLIC_NAMES)
def test_public_import_paths_keep_working(module, name, defined_in):
    obj = getattr(importlib.import_module(module), name)
    assert getattr(obj, "__module__", None) == defined_in


def test_search_module_has_no_module_getattr():
    """GalleryIndex is a plain attribute of bct_fast.search (no lazy __getattr__ hiding a cycle)."""
    import bct_fast.search as search

    assert "GalleryIndex" in vars(search) and "__getattr__" not in vars(search)
