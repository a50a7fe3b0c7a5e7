"""Hostile inputs across the public API: each case must give the correct result or a clear error
that names the argument; never a silent wrong answer, a raw Python error or a crash.

Each case is one row of the README's reliability table (section "Reliability")."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bct_fast import losses, train
from bct_fast.evaluate import cross_test
from bct_fast.metrics import evaluate_retrieval, pair_scores, retrieval_metrics, tar_at_far
from bct_fast.ops import cosine_margin_cross_entropy, cosine_topk
from bct_fast.ops.reference import cosine_margin_cross_entropy_ref
from topk_reference import assert_topk_matches_reference


# ---- scale: cosine is scale-free, so huge / tiny finite rows must give the unscaled answer ----

SCALES = [1e20, 1e30, 3e36, 1e-13, 1e-25, 1e-35]


@pytest.mark.parametrize("scale", SCALES)
def test_search_is_scale_free(seed, scale):
    q, g = torch.randn(7, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
    s, i = cosine_topk((q * scale).float(), (g * scale).float(), 20)
    assert_topk_matches_reference(s, i, q, g, 20, atol=2e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_margin_loss_is_scale_free(seed, scale):
    x, w = torch.randn(9, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    y = torch.randint(0, 40, (9,))
    xs = (x * scale).float().requires_grad_(True)
    got = cosine_margin_cross_entropy(xs, (w * scale).float(), y, scale=16.0, margin_type="arcface", margin=0.3)
    ref = cosine_margin_cross_entropy_ref(x, w, y, scale=16.0, margin_type="arcface", margin=0.3)
    assert abs(float(got.detach()) - float(ref)) < 1e-5 * abs(float(ref))
    got.backward()
    assert torch.isfinite(xs.grad).all()


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_l2_loss_is_scale_free(seed, scale):
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    ref = (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
    got = losses.L2CompatibilityLoss()((a * scale).float(), (b * scale).float())
    assert abs(float(got) - float(ref)) < 1e-5 * float(ref)


def test_tiny_norm_row_ranks_by_its_cosine():
    """A gallery row of norm 1e-14 pointing at the query has cosine 1 and must rank first
    (F.normalize's eps left it at 1e-2 and last)."""
    g = torch.randn(50, 4)
    g[17] = torch.tensor([1e-14, 0, 0, 0])
    s, i = cosine_topk(torch.tensor([[1.0, 0, 0, 0]]), g, 3)
    assert int(i[0, 0]) == 17 and abs(float(s[0, 0]) - 1) < 1e-6


# ---- metrics: rankings and ranks that make no sense are refused --------------------------------

def test_metrics_refuse_repeated_gallery_rows():
    idx = torch.tensor([[0, 0, 1], [1, 2, 0]])
    lab = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="indices: row 0 lists a gallery item more than once"):
        retrieval_metrics(idx, torch.tensor([0, 1]), lab, include=["mean_average_precision"])


@pytest.mark.parametrize("recall_at,exc", [((0,), ValueError), ((-2,), ValueError), ((1.5,), TypeError),
                                           ((True,), TypeError), (5, TypeError)])
def test_metrics_refuse_bad_recall_ranks(recall_at, exc):
    idx = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(exc, match="recall_at"):
        retrieval_metrics(idx, torch.tensor([0, 1]), torch.tensor([0, 1]), recall_at=recall_at)


def test_metrics_refuse_bool_indices_and_non_boolean_pair_flags():
    with pytest.raises(TypeError, match="indices"):
        retrieval_metrics(torch.tensor([[True, False]]), torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="is_same"):
        tar_at_far(torch.rand(10), torch.rand(10))


def test_evaluate_retrieval_needs_two_rows_for_leave_one_out():
    with pytest.raises(ValueError, match="query: leave-one-out"):
        evaluate_retrieval(torch.randn(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="gallery: must not be empty"):
        evaluate_retrieval(torch.randn(3, 4), torch.tensor([0, 1, 0]), torch.randn(0, 4), torch.tensor([], dtype=torch.long))


# ---- search arguments users pass from numpy ---------------------------------------------------

def test_numpy_integer_k_and_big_endian_arrays(seed):
    q, g = torch.randn(4, 8), torch.randn(60, 8)
    s, i = cosine_topk(q.numpy().astype(">f4"), g.numpy().astype(">f4"), np.int64(5))
    assert_topk_matches_reference(s, i, q, g, 5)
    s2, i2 = cosine_topk(q, g.numpy().astype(">f8"), 5)  # a float64 big-endian gallery
    assert torch.equal(i2, i)
    with pytest.raises(ValueError, match="k: expected an integer"):
        cosine_topk(q, g, 5.0)


# ---- losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(num_classes=2.5, embedding_size=4), TypeError, "num_classes"),
    (dict(num_classes=0, embedding_size=4), ValueError, "num_classes"),
    (dict(num_classes=3, embedding_size="4"), TypeError, "embedding_size"),
])
def test_loss_module_sizes(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        losses.CosFaceLoss(**kwargs)


def test_loss_modules_accept_numpy_sizes():
    assert losses.CosFaceLoss(np.int64(5), np.int32(4)).weight.shape == (5, 4)


def test_l2_loss_refuses_nan_and_1d():
    with pytest.raises(ValueError, match="new_embeddings: contains NaN"):
        losses.L2CompatibilityLoss()(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="old_embeddings"):
        losses.L2CompatibilityLoss()(torch.ones(2, 2), torch.ones(2))


def test_influence_loss_with_uint8_labels(seed):
    w = torch.randn(6, 8)
    infl = losses.InfluenceLoss(w, scale=8.0)
    x = torch.randn(5, 8)
    y = torch.tensor([0, 5, 9, 2, 200], dtype=torch.uint8)  # 9 and 200 have no old row: ignored
    got = infl(x, y)
    ref = cosine_margin_cross_entropy(x, w, torch.tensor([0, 5, -100, 2, -100]), scale=8.0)
    assert torch.allclose(got, ref)
    with pytest.raises(ValueError, match="labels"):
        infl(x, torch.zeros(4, dtype=torch.long))


class _Loader(list):
    pass


def _tiny_loader(labels_dtype=torch.long):
    g = torch.Generator().manual_seed(0)
    return _Loader([(torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]).to(labels_dtype))])


def test_class_mean_classifier_arguments():
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="num_classes"):
        losses.class_mean_classifier(model, _tiny_loader(), 0, progress=False)
    with pytest.raises(TypeError, match="loader: labels"):
        losses.class_mean_classifier(model, _tiny_loader(torch.float32), 3, progress=False)
    with pytest.raises(ValueError, match="old_weight"):
        losses.synthesize_classifier(model, _tiny_loader(), torch.randn(4), 3, progress=False)


def test_models_returning_embedding_and_logits():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x):
            e = self.lin(x)
            return e, e.sum(1)

    m = Two()
    emb, lab = train.embed(m, _tiny_loader())
    assert emb.shape == (6, 4) and lab.tolist() == [0, 1, 2, 0, 1, 2]
    means = losses.class_mean_classifier(m, _tiny_loader(), 3, progress=False)
    assert means.shape == (3, 4)


# ---- training loop -----------------------------------------------------------------------------

def test_fit_refuses_a_per_row_loss():
    model = torch.nn.Linear(3, 4)
    loss = losses.CosFaceLoss(3, 4, reduction="none")
    with pytest.raises(ValueError, match="loss: returned shape"):
        train.fit(model, loss, _tiny_loader(), 1, progress=False)


def test_resume_with_another_optimizer_type_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    model, loss = torch.nn.Linear(3, 4), losses.CosFaceLoss(3, 4)
    train.fit(model, loss, _tiny_loader(), 1, checkpoint=ckpt, progress=False)
    sgd = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer: .* written with Adam, not SGD"):
        train.fit(model, loss, _tiny_loader(), 2, optimizer=sgd, checkpoint=ckpt, progress=False)


# ---- cross-model evaluation --------------------------------------------------------------------

def test_cross_test_inputs():
    lab = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="old_query"):
        cross_test(torch.randn(4), torch.randn(4, 2), lab)
    e = torch.randn(4, 3)
    r = cross_test(e, e, lab, old_gallery=e, new_gallery=e, gallery_labels=lab, exclude_self=True)
    same = cross_test(e, e, lab)
    assert r.old_old == same.old_old  # galleries equal to the queries + exclude_self = leave-one-out
    with pytest.raises(ValueError, match="exclude_self"):
        cross_test(e, e, lab, exclude_self=False)


# ---- command line ------------------------------------------------------------------------------

def _file(d: Path, content: bytes | None) -> Path:
    p = d / "q.npy"
    p.mkdir() if content is None else p.write_bytes(content)
    return p


@pytest.mark.parametrize("content,needle", [(b"", "not a readable .npy"), (None, "is a directory"),
                                            (b"\x93NUMPY garbage", "not a readable .npy")],
                         ids=["empty", "directory", "garbage"])
def test_cli_eval_bad_files(tmp_path, content, needle):
    path = _file(tmp_path, content)
    np.save(tmp_path / "l.npy", np.zeros(3, dtype=np.int64))
    out = subprocess.run([sys.executable, "-m", "bct_fast.cli", "eval", "--query", str(path), "--query-labels",
                          str(tmp_path / "l.npy")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cli_eval_bad_k_and_big_endian_input(tmp_path):
    q = np.random.default_rng(0).standard_normal((10, 4)).astype(">f4")
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "l.npy", np.array([0, 1] * 5, dtype=">i8"))
    base = [sys.executable, "-m", "bct_fast.cli", "eval", "--query", str(tmp_path / "q.npy"),
            "--query-labels", str(tmp_path / "l.npy")]
    bad = subprocess.run(base + ["--k", "abc"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--k: expected" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(base + ["--k", "3", "--recall-at", "1"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad_r = subprocess.run(base + ["--recall-at", "0"], capture_output=True, text=True, timeout=120)
    assert bad_r.returncode == 2 and "recall_at" in bad_r.stderr


# ---- strides and dtypes: views and low precision give the same answers --------------------------

def test_strided_views_give_the_contiguous_answer(seed):
    big_q, big_g = torch.randn(9, 40), torch.randn(64, 600)
    q, g = big_q[::2, ::2], big_g.T[::2, 3:23]           # non-contiguous, transposed storage
    s, i = cosine_topk(q, g, 11)
    s2, i2 = cosine_topk(q.contiguous(), g.contiguous(), 11)
    assert torch.equal(i, i2) and torch.allclose(s, s2)
    x, w = torch.randn(7, 30)[:, ::3], torch.randn(20, 50).T[:, ::2]  # [7, 10], [50, 10] views
    y = torch.randint(0, w.shape[0], (7,))
    a = cosine_margin_cross_entropy(x, w, y, scale=8.0, margin_type="cosface", margin=0.2)
    b = cosine_margin_cross_entropy(x.contiguous(), w.contiguous(), y, scale=8.0, margin_type="cosface", margin=0.2)
    assert torch.allclose(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu_inputs(seed, dtype):
    q, g = torch.randn(5, 32).to(dtype), torch.randn(400, 32).to(dtype)
    s, i = cosine_topk(q, g, 9)
    assert s.dtype == torch.float32
    assert_topk_matches_reference(s, i, q.float(), g.float(), 9, atol=1e-5)  # exact for the rounded inputs
    x, w = torch.randn(6, 32).to(dtype).requires_grad_(True), torch.randn(40, 32).to(dtype)
    y = torch.randint(0, 40, (6,))
    loss = cosine_margin_cross_entropy(x, w, y, scale=16.0)
    ref = cosine_margin_cross_entropy_ref(x.detach().double(), w.double(), y, scale=16.0)
    assert abs(float(loss.detach()) - float(ref)) < 1e-4 * abs(float(ref))
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


# ---- arguments of the wrong kind: a TypeError naming them, never a raw AttributeError -------------
# (found by a sweep of None / list / str / complex values over the public entry points, 2026-11-26)

WRONG_KIND = [None, [[1.0, 2.0]], "abc"]


@pytest.mark.parametrize("value", WRONG_KIND, ids=["None", "list", "str"])
def test_wrong_kind_of_embeddings_is_named(value):
    lab = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="query: expected a torch.Tensor"):
        evaluate_retrieval(value, lab)
    if value is not None:  # gallery=None is leave-one-out retrieval
        with pytest.raises(TypeError, match="gallery: expected a torch.Tensor"):
            evaluate_retrieval(torch.randn(4, 3), lab, value, lab)
    with pytest.raises(TypeError, match="old_query: expected a torch.Tensor"):
        cross_test(value, torch.randn(4, 3), lab)
    with pytest.raises(TypeError, match="b: expected a torch.Tensor"):
        pair_scores(torch.randn(4, 3), value)


@pytest.mark.parametrize("value,why", [(None, "got NoneType"), ("abc", "got str"), ([1.0, None], "got list"),
                                       (torch.ones(3, dtype=torch.complex64), "expected real numbers")])
def test_wrong_kind_of_pair_scores_is_named(value, why):
    with pytest.raises(TypeError, match=f"scores: .*{why}"):
        tar_at_far(value, torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match=f"is_same: .*{why}"):
        tar_at_far(torch.rand(3), value)


def test_flat_index_refuses_results_that_cannot_fit(monkeypatch):
    """faiss pads k past ntotal, so the [n, k] results exist whatever k is: k = 10**12 used to be
    an allocator error, or on a host that overcommits the process killed while filling them."""
    from bct_fast._core import checks
    from bct_fast.search import FlatIndex

    index = FlatIndex(4)
    index.add(np.random.rand(6, 4).astype(np.float32))
    xq = np.random.rand(2, 4).astype(np.float32)
    with pytest.raises(ValueError, match=r"k: the \[2, 1000000000000\] results would take"):
        index.search(xq, 10**12)
    monkeypatch.setattr(checks, "free_bytes", lambda device: 12 * 2 * 100)  # room for k = 100 only
    assert index.search(xq, 100)[1].shape == (2, 100)
    with pytest.raises(ValueError, match=r"k: the \[2, 101\] results would take"):
        index.search(xq, 101)


def test_fit_refuses_a_diverged_model_and_keeps_the_last_good_checkpoint(tmp_path):
    """A loss gone NaN made every parameter NaN and fit returned that model silently (and
    checkpointed it). Now: a ValueError naming the parameter, the checkpoint of the epoch before."""
    class NanAtSecondEpoch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, emb, labels):
            self.calls += 1
            return emb.pow(2).mean() * (float("nan") if self.calls > 1 else 1.0)

    model, ckpt = torch.nn.Linear(4, 4), tmp_path / "run.ckpt"
    batches = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.int64))]
    with pytest.raises(ValueError, match=r"training diverged: parameter (weight|bias) holds NaN or inf after epoch 1"):
        train.fit(model, NanAtSecondEpoch(), batches, epochs=3, checkpoint=ckpt, progress=False)
    state = train.load_checkpoint(ckpt)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1e-3, True, "1e-3"])
def test_fit_refuses_a_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="lr: expected a finite non-negative number"):
        train.fit(torch.nn.Linear(4, 4), losses.CosFaceLoss(3, 4), [(torch.randn(2, 4), torch.zeros(2, dtype=torch.int64))],
                  epochs=1, lr=lr, progress=False)


def test_more_wrong_kinds_are_named():
    from bct_fast import transformation as fct

    with pytest.raises(TypeError, match="embeddings: expected a 2-D tensor"):
        losses.match_dim(torch.randn(4), 3)
    with pytest.raises(TypeError, match="embeddings: expected a 2-D tensor"):
        losses.match_dim(None, 3)
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        losses.ArcFaceLoss(3, 4, margin=0.5).load_pml_weight([[0.0] * 3] * 4)
    with pytest.raises(ValueError, match="margin: expected a finite float"):
        losses.CosFaceLoss(3, 4, margin=True)
    old = torch.randn(5, 4)
    old[2, 1] = float("nan")
    with pytest.raises(ValueError, match="old_embeddings"):
        fct.upgrade_gallery(fct.EmbeddingTransformation(4, 4), old)


def test_fit_checks_the_checkpoint_folder_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with pytest.raises(OSError):
        train.fit(model, losses.CosFaceLoss(3, 4), [(torch.randn(2, 4), torch.zeros(2, dtype=torch.int64))],
                  epochs=1, checkpoint=blocker / "run.ckpt", progress=False)
    assert torch.equal(model.weight, before)  # no epoch ran


def test_numpy_galleries_of_the_wrong_shape_or_dtype_are_named():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"gallery: expected a non-empty 2-D array \[rows, dim\], got shape \(0, 4\)"):
        cosine_topk(q, np.zeros((0, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="gallery: expected a non-empty 2-D array"):
        cosine_topk(q, np.zeros(4, dtype=np.float32), 1)
    with pytest.raises(TypeError, match="gallery: numpy dtype int64 is not supported"):
        cosine_topk(q, np.zeros((5, 4), dtype=np.int64), 1)
    with pytest.raises(ValueError, match="exclude_self: query i must be gallery row i, but there are 3 queries"):
        cosine_topk(q, torch.randn(2, 4), 1, exclude_self=True)
