"""The Python glue of the SIMT margin-softmax provider (bct_fast.ops.margin_softmax_cuda) on the
CPU: its two launches replaced by the kernel emulator's (same launchers, CPU tensors), so the
class splits, the log-sum-exp merge of the per-split (m, l, acc), the pws normalization, the gx
rescale to the given lse and the grad_weight launch run as on a GPU. Checked against the torch
provider (same contract) on float64 copies of the inputs, and end to end against the float64
loss reference. The kernels alone are checked in test_kernels_emulated.py.

The first GPU run found gx taken from the non-target softmax without the rescale (wrong
grad_embeddings of trainable classifiers, NaN for C = 1): test_grads is the regression test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernel_emulator as emu
import test_kernels_emulated
from bct_fast.ops import margin_softmax_cuda as msc
from bct_fast.ops import margin_softmax_torch as mst
from bct_fast.ops.native_call import DTYPE_CODES
from bct_fast.ops.rows import inv_row_norms
from test_kernels_emulated import H100_SMS, assert_close
from test_margin_ce import check_against_reference, inputs

pytestmark = pytest.mark.emulated

# The session fixture of the kernel tests: skips without Linux / g++, builds the emulator once.
_built = test_kernels_emulated._built

SEED = (1,)  # one schedule seed: the kernel-level tests try three
SCALE = 16.0


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as the emulator takes them (bf16 as its bit pattern)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _put(out: dict[str, bytes], name: str, t: torch.Tensor) -> None:
    t.copy_(torch.from_numpy(np.frombuffer(out[name], np.float32).copy()).view(t.shape))


def _params(x, w, scale):
    return dict(B=x.shape[0], C=w.shape[0], d=x.shape[1], dtype=DTYPE_CODES[x.dtype], scale=scale)


def _arrays(x, w, inv_nx, inv_nw, labels, **more):
    return {k: _np(v) for k, v in dict(x=x, w=w, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels, **more).items()}


def emu_stats_launch(x, w, inv_nx, inv_nw, labels, scale, splits, m, l, acc):
    """msc.native_stats_launch's launcher call, run by the kernel emulator (CPU tensors)."""
    out = emu.run("stats", _arrays(x, w, inv_nx, inv_nw, labels),
                  dict(_params(x, w, scale), splits=splits, with_acc=acc is not None), seeds=SEED)
    _put(out, "m", m)
    _put(out, "l", l)
    if acc is not None:
        _put(out, "acc", acc)


def emu_grad_weight_launch(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, gw):
    """msc.native_grad_weight_launch's launcher call, run by the kernel emulator."""
    out = emu.run("grad_weight", _arrays(x, w, inv_nx, inv_nw, labels, lse=lse,
                                         row_coef=row_coef), _params(x, w, scale), seeds=SEED)
    _put(out, "gw", gw)


LAUNCHES = dict(launch_stats=emu_stats_launch, launch_grad_weight=emu_grad_weight_launch)


def case(B, C, d, dtype, seed):
    """Inputs of the sweeps as CosineMarginCrossEntropyFunction passes them: x, w in ``dtype``,
    fp32 inverse norms, labels with some rows at -1 (no target)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=gen).to(dtype)
    w = torch.randn(C, d, generator=gen).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[torch.rand(B, generator=gen) < 0.3] = -1
    labels[-1] = C - 1  # at least one target, in the last (partial) class tile
    if B > 1:
        labels[0] = -1
    return x, w, inv_row_norms(x, torch.float32), inv_row_norms(w, torch.float32), labels


def f64(args):
    return tuple(a.double() if a.is_floating_point() else a for a in args)


def check(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape, what
    assert_close(got.numpy(), ref.numpy(), tol, what)


# S = min(4 sms / ceil(B / 32), ceil(C / 256), 1024): one split up to 256 classes, 2 at 300,
# 3 at 600; sms = 1 caps the 1100 classes at 4 splits (5 with an H100's 132 SMs).
SHAPES = [(1, 1, 8, H100_SMS), (3, 1, 5, H100_SMS), (1, 37, 40, H100_SMS), (9, 300, 33, H100_SMS),
          (5, 600, 17, H100_SMS), (4, 1100, 8, 1)]
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)]


def test_shapes_give_several_class_splits():
    cpu = torch.device("cpu")
    assert [msc._class_splits(B, C, cpu, sms) for B, C, _, sms in SHAPES] == [1, 1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="sms: needed"):
        msc._class_splits(3, 300, torch.device("cpu"))


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,C,d,sms", SHAPES)
def test_stats(B, C, d, sms, dtype, tol):
    """lse and pws over the non-target columns vs the torch provider in float64; a row with no
    non-target column (C = 1 and a label) has lse -inf and pws 0, never NaN."""
    args = case(B, C, d, dtype, seed=B * 1000 + C)
    lse, pws = msc.softmax_stats(*args, SCALE, True, launch_stats=emu_stats_launch, sms=sms)
    lse_only, empty = msc.softmax_stats(*args, SCALE, False, launch_stats=emu_stats_launch, sms=sms)
    ref_lse, ref_pws = mst.softmax_stats(*f64(args), SCALE, True)
    none = torch.isneginf(ref_lse)
    assert none.any() == (C == 1 and bool((args[4] >= 0).any()))
    ref_pws[none] = 0.0  # the torch provider gives 0 / 0 there; the caller masks it
    assert lse.dtype == torch.float64 and torch.equal(lse, lse_only) and empty.numel() == 0
    assert_close(lse.numpy(), ref_lse.numpy(), tol, "lse")
    check(pws, ref_pws, tol, "pws")


def full_lse(lse_rest: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The lse over all columns, as CosineMarginCrossEntropyFunction forms it (fp32, as its
    backward passes it)."""
    z = target.double()
    return torch.where(labels >= 0, torch.logaddexp(lse_rest, z), lse_rest).float()


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,C,d,sms", SHAPES)
def test_grads(B, C, d, sms, dtype, tol):
    """gx = P @ W_hat and gw = P.T @ X_hat with P from the full lse (target column included),
    vs the torch provider in float64: gx must be rescaled from the non-target softmax."""
    args = case(B, C, d, dtype, seed=B * 1000 + C + 1)
    lse_rest, _ = mst.softmax_stats(*f64(args), SCALE, False)
    gen = torch.Generator().manual_seed(B + C)
    # Target logits around the rest's lse, p_y = sigmoid(z_y - lse_rest) in (0.27, 0.95): gx
    # (the rest's softmax times 1 - p_y) differs clearly from the rest's softmax alone.
    target = (torch.where(torch.isfinite(lse_rest), lse_rest, 0.0).float()
              + 4 * torch.rand(B, generator=gen) - 1)
    lse = full_lse(lse_rest, target, args[4])
    row_coef = 2 * torch.rand(B, generator=gen) - 1
    row_coef[torch.rand(B, generator=gen) < 0.2] = 0.0  # skipped rows (ignored labels)
    row_coef[-1] = 0.5  # the row with a target counts
    gx, gw = msc.softmax_grads(*args, lse, row_coef, SCALE, True, True, **LAUNCHES, sms=sms)
    ref_gx, ref_gw = mst.softmax_grads(*f64(args), lse.double(), row_coef.double(), SCALE, True, True)
    check(gx, ref_gx, tol, "gx")
    check(gw, ref_gw, tol, "gw")
    if C == 1:  # a labelled row has no other column: P = 0
        assert (gx[args[4] >= 0] == 0).all()
    # One at a time: each output alone, the other empty.
    gx_only, e1 = msc.softmax_grads(*args, lse, row_coef, SCALE, True, False, **LAUNCHES, sms=sms)
    e2, gw_only = msc.softmax_grads(*args, lse, row_coef, SCALE, False, True, **LAUNCHES, sms=sms)
    assert torch.equal(gx_only, gx) and torch.equal(gw_only, gw) and e1.numel() == e2.numel() == 0


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_loss_gradients_through_the_glue(monkeypatch, dtype, tol, frozen):
    """cosine_margin_cross_entropy with the CPU op kernels' torch provider replaced by this glue
    on the emulated kernels: loss and gradients vs the float64 reference (the frozen classifier
    takes pws from the forward sweep, the trainable one softmax_grads with the full lse)."""
    calls = []

    def via_glue(fn, **launches):
        def provider(*args):  # the torch provider's trailing chunk size is not the glue's
            calls.append(fn.__name__)
            return fn(*args[:-1], **launches, sms=1)  # 300 classes: 2 splits
        return provider

    monkeypatch.setattr(mst, "softmax_stats", via_glue(msc.softmax_stats, launch_stats=emu_stats_launch))
    monkeypatch.setattr(mst, "softmax_grads", via_glue(msc.softmax_grads, **LAUNCHES))
    torch.manual_seed(5)
    _, w, y = inputs(7, 300, 24, "cpu", dtype=dtype, ignore_rows=(2,))
    # Rows near their class (target probabilities 0.996 .. 0.9999, as late in training), so
    # that the target column's share of the softmax matters for grad_embeddings.
    x = (w[y.clamp_min(0)].float() + 0.3 * torch.randn(7, 24)).to(dtype)
    check_against_reference(x, w, y, frozen, tol, scale=32.0, margin_type="arcface", margin=0.4,
                            label_smoothing=0.1)
    assert calls == (["softmax_stats"] if frozen else ["softmax_stats", "softmax_grads"])
