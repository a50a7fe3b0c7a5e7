"""The margin-softmax op family: torch.library ops with per-device kernels, the autograd Function.

Two primitive ops carry every B x C sweep of the normalized-softmax loss family:

- ``bct_fast::softmax_stats``: over each row's non-target columns, the log-sum-exp of the
  logits (float64: ``m + log l`` of the fp32 running statistics), optionally with the
  softmax-weighted sum of normalized class rows (the frozen-classifier gradient, in one pass).
- ``bct_fast::softmax_grads``: P @ W_hat and P.T @ X_hat for the backward pass (softmax from the
  full lse), P = 0 in each row's target column.

The target column stays out of every sweep (the sweeps never see the margin logit):
:class:`CosineMarginCrossEntropyFunction` combines the statistics with the target logit in
float64, t = lse_rest - z_y: loss = log(1 + e^t), p_y - 1 = -sigmoid(t). Formed as
exp(z_y - lse) - 1 from an fp32 lse (error ~ulp(scale)), p_y - 1 made the fp32 gradients of
well-classified rows 5-8x less accurate than plain PyTorch's at scale 64 (losses 1e-2 .. 1e-6).

Each has a CUDA registration that asks :func:`bct_fast.ops.providers.choose` for the provider
(verified and the default since 2026-11-26: the fused tensor-core forward for bf16,
:mod:`bct_fast.ops.margin_softmax_fused`, and the epilogue provider -- cuBLAS GEMMs + our
epilogue kernels, :mod:`bct_fast.ops.margin_softmax_epilogue` -- for the bf16 backward and fp32;
the ``bct_fast._C`` SIMT kernels on request; the chunked PyTorch path for the rest), a CPU registration (chunked PyTorch; with ``backend="epilogue"`` the
epilogue chunk loop with the PyTorch twin of its kernels) and a fake implementation so that
``torch.compile`` can trace them. Everything of size B (target cosines, margins, the loss itself) is plain PyTorch in
:class:`CosineMarginCrossEntropyFunction`, shared by both devices.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import check_choice, check_labels, check_matrix, check_same_device, nonfinite_error
from bct_fast.ops import margin_softmax_cuda
from bct_fast.ops import margin_softmax_epilogue
from bct_fast.ops import margin_softmax_fused
from bct_fast.ops import margin_softmax_torch
from bct_fast.ops.margins import Margin, MarginValue, make_margin, target_function
from bct_fast.ops.providers import check_backend, choose, note_fallback
from bct_fast.ops.rows import inv_row_norms, normalized_rows

__all__ = ["cosine_margin_cross_entropy", "CosineMarginCrossEntropyFunction", "check_loss_options",
           "normalization_backward_rows"]


# ---- op definitions ----------------------------------------------------------------------

torch.library.define(
    "bct_fast::softmax_stats",
    "(Tensor x, Tensor w, Tensor inv_nx, Tensor inv_nw, Tensor labels, "
    "float scale, bool with_pws, int chunk_size, str backend='auto') -> (Tensor, Tensor)",
)
torch.library.define(
    "bct_fast::softmax_grads",
    "(Tensor x, Tensor w, Tensor inv_nx, Tensor inv_nw, Tensor labels, "
    "Tensor lse, Tensor row_coef, float scale, bool need_x, bool need_w, int chunk_size, "
    "str backend='auto') "
    "-> (Tensor, Tensor)",
)


@torch.library.register_fake("bct_fast::softmax_stats")
def _stats_fake(x, w, inv_nx, inv_nw, labels, scale, with_pws, chunk_size, backend="auto"):
    B, d = x.shape
    lse = x.new_empty((B,), dtype=torch.float64)
    return lse, x.new_empty((B, d) if with_pws else (0,), dtype=inv_nx.dtype)


@torch.library.register_fake("bct_fast::softmax_grads")
def _grads_fake(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, need_x, need_w, chunk_size,
                backend="auto"):
    B, d = x.shape
    C = w.shape[0]
    return (x.new_empty((B, d) if need_x else (0,), dtype=inv_nx.dtype),
            x.new_empty((C, d) if need_w else (0,), dtype=inv_nx.dtype))


def _provider(op: str, x: Tensor, w: Tensor, backend: str) -> str:
    choice = choose("margin_softmax", x.device, backend, lambda: margin_softmax_cuda.unsupported(x, w),
                    lambda: margin_softmax_epilogue.unsupported(x, w),
                    lambda: margin_softmax_fused.unsupported(x, w))
    note_fallback(op, choice)
    return choice.provider


@torch.library.register_kernel("bct_fast::softmax_stats", "cpu")
def _stats_cpu(x, w, inv_nx, inv_nw, labels, scale, with_pws, chunk_size, backend="auto"):
    # "epilogue" runs the chunk loop with the kernels' PyTorch twin; "fused" raises (CUDA only).
    if backend in ("epilogue", "fused") and _provider("softmax_stats", x, w, backend) == "epilogue":
        return margin_softmax_epilogue.softmax_stats(x, w, inv_nx, inv_nw, labels, scale,
                                                     with_pws, chunk_size)
    return margin_softmax_torch.softmax_stats(x, w, inv_nx, inv_nw, labels, scale, with_pws, chunk_size)


@torch.library.register_kernel("bct_fast::softmax_grads", "cpu")
def _grads_cpu(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, need_x, need_w, chunk_size,
               backend="auto"):
    if backend in ("epilogue", "fused") and _provider("softmax_grads", x, w, backend) == "epilogue":
        return margin_softmax_epilogue.softmax_grads(x, w, inv_nx, inv_nw, labels, lse,
                                                     row_coef, scale, need_x, need_w, chunk_size)
    return margin_softmax_torch.softmax_grads(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale,
                                  need_x, need_w, chunk_size)


@torch.library.register_kernel("bct_fast::softmax_stats", "cuda")
def _stats_cuda(x, w, inv_nx, inv_nw, labels, scale, with_pws, chunk_size, backend="auto"):
    provider = _provider("softmax_stats", x, w, backend)
    if provider == "cuda":
        return margin_softmax_cuda.softmax_stats(x, w, inv_nx, inv_nw, labels, scale, with_pws)
    if provider == "fused":
        return margin_softmax_fused.softmax_stats(x, w, inv_nx, inv_nw, labels, scale,
                                                  with_pws, chunk_size)
    if provider == "epilogue":
        return margin_softmax_epilogue.softmax_stats(x, w, inv_nx, inv_nw, labels, scale,
                                                     with_pws, chunk_size)
    return margin_softmax_torch.softmax_stats(x, w, inv_nx, inv_nw, labels, scale, with_pws,
                                              chunk_size)


@torch.library.register_kernel("bct_fast::softmax_grads", "cuda")
def _grads_cuda(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale, need_x, need_w, chunk_size,
                backend="auto"):
    provider = _provider("softmax_grads", x, w, backend)
    if provider == "cuda":
        return margin_softmax_cuda.softmax_grads(x, w, inv_nx, inv_nw, labels, lse, row_coef,
                                                 scale, need_x, need_w)
    if provider in ("epilogue", "fused"):  # the fused provider's backward is the epilogue's
        return margin_softmax_epilogue.softmax_grads(x, w, inv_nx, inv_nw, labels, lse,
                                                     row_coef, scale, need_x, need_w, chunk_size)
    return margin_softmax_torch.softmax_grads(x, w, inv_nx, inv_nw, labels, lse, row_coef, scale,
                                              need_x, need_w, chunk_size)


# ---- autograd ------------------------------------------------------------------------------

def normalization_backward_rows(t: Tensor, inv_n: Tensor, grad_hat: Tensor, chunk: int | None = None) -> Tensor:
    """Gradient through t_hat = t * inv_n, in place on ``grad_hat`` (chunked rows):
    d t = inv_n * (g - t_hat (t_hat . g)). Row-wise, so ``chunk`` only bounds the temporaries
    (default: 4096 rows on a CPU, cache-sized; ~16M elements on a GPU, where 4096-row chunks of a
    1M-class weight gradient meant ~1,700 small kernel launches)."""
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, t.shape[1])) if t.is_cuda else 4096

    def rows(g: Tensor, t_rows: Tensor, inv: Tensor) -> None:
        th = normalized_rows(t_rows, inv)
        g.sub_(th * (th * g).sum(1, keepdim=True)).mul_(inv[:, None])

    if t.shape[0] <= chunk:  # one chunk: no slicing (a small problem's fixed cost)
        rows(grad_hat, t, inv_n)
    else:
        for r0 in range(0, t.shape[0], chunk):
            rows(grad_hat[r0:r0 + chunk], t[r0:r0 + chunk], inv_n[r0:r0 + chunk])
    return grad_hat


class CosineMarginCrossEntropyFunction(torch.autograd.Function):
    """Fused normalized-softmax margin cross-entropy; see :func:`cosine_margin_cross_entropy`."""

    @staticmethod
    @without_autocast
    def forward(ctx, x: Tensor, w: Tensor, labels: Tensor, scale: float, margin: Margin,
                straight_through: bool, reduction: str, ignore_index: int, label_smoothing: float,
                chunk_size: int, validate: bool, fuse_grad: bool, backend: str) -> Tensor:
        orig_dtypes = (x.dtype, w.dtype)
        dt = torch.promote_types(x.dtype, w.dtype)
        x, w = x.to(dt), w.to(dt)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        C = w.shape[0]
        eps = float(label_smoothing)

        labels = labels.to(torch.int64)
        valid = labels != ignore_index
        in_range = labels.clamp(0, C - 1) == labels
        safe = torch.where(valid & in_range, labels, 0)
        lab_eff = torch.where(valid, safe, -1)

        inv_nx, inv_nw = inv_row_norms(x, acc), inv_row_norms(w, acc)
        xh = normalized_rows(x, inv_nx)
        wyh = normalized_rows(w.index_select(0, safe), inv_nw.index_select(0, safe))
        cos_y = (xh * wyh).sum(1)
        f, df = target_function(cos_y, margin, straight_through)
        z_y = scale * f

        # Frozen classifier: the forward sweep also produces d(loss)/d(x_hat) (one pass).
        fused = fuse_grad and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        lse_rest, pws = torch.ops.bct_fast.softmax_stats(x, w, inv_nx, inv_nw, lab_eff, scale, fused,
                                                         chunk_size, backend)
        # The sweeps leave the target column out; combined with it in float64, t = lse_rest - z_y
        # gives the row's loss lse - z_y = log(1 + e^t) and 1 - p_y = sigmoid(t) without
        # cancellation, however well classified the row.
        z64 = z_y.to(torch.float64)
        t = lse_rest - z64
        has_t = lab_eff >= 0
        lse = torch.where(has_t, torch.logaddexp(lse_rest, z64), lse_rest)
        if fused:  # pws over all columns but the target: rescale from the rest's softmax to the full one
            pws = torch.where(torch.isneginf(lse_rest)[:, None], 0.0,
                              pws * torch.sigmoid(t).to(pws.dtype)[:, None])
        rows = torch.logaddexp(t, t.new_zeros(()))
        rows = (rows + eps * z64 if eps > 0 else rows).to(acc)
        wsum = None
        if eps > 0:
            wsum = margin_softmax_torch.weighted_row_sum(w, inv_nw)  # sum_j w_hat_j
            rows = rows - (eps / C) * (scale * (xh @ wsum) - scale * cos_y + z_y)
        rows = torch.where(valid, rows, 0.0)
        n_valid = valid.sum()

        if validate and not torch.compiler.is_compiling():
            bad_label = valid & ~in_range
            # One host sync for both checks: rows * 0 sums to NaN iff a row is NaN or inf.
            flags = torch.stack([bad_label.any().to(rows.dtype), (rows * 0).sum()]).tolist()
            if flags[0]:
                found = labels[bad_label][:5].tolist()
                raise ValueError(f"labels: values must lie in [0, {C}) or equal ignore_index="
                                 f"{ignore_index}; found {found}")
            if flags[1] != 0:
                raise nonfinite_error({"embeddings": x, "weight": w})

        if reduction == "none":
            loss = rows.clone()  # not an intermediate itself (see the return below)
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / n_valid.clamp_min(1)

        ctx.save_for_backward(x, w, inv_nx, inv_nw, lab_eff, safe, valid, xh, wyh, df, lse, t,
                              pws if fused else None, wsum, n_valid)
        ctx.cfg = (scale, reduction, eps, chunk_size, orig_dtypes, fused, backend)
        # loss is already in acc (fp32, or fp64 for fp64 inputs). No no-op .to(): under torch 2.11
        # dynamo returns every forward intermediate from a traced Function, and an output that is
        # the same tensor as one of them takes its gradient away (zero gradients when compiled).
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    def backward(ctx, grad_out: Tensor):
        (x, w, inv_nx, inv_nw, lab_eff, safe, valid, xh, wyh, df, lse, t, pws, wsum,
         n_valid) = ctx.saved_tensors
        scale, reduction, eps, chunk_size, (x_dtype, w_dtype), fused, backend = ctx.cfg
        need_x, need_w = ctx.needs_input_grad[:2]
        C = w.shape[0]
        acc = inv_nx.dtype

        go = grad_out.to(acc)
        if reduction == "mean":
            go = go / n_valid.clamp_min(1).to(acc)
        go = torch.where(valid, go, 0.0)
        r = go * scale
        # The target column, left out of the sweeps: coefficient f'(c_y) (p_y - (1 - eps) - eps/C)
        # + eps/C (the -eps/C of every column is the wsum term below). In float64, with
        # p_y - 1 = -sigmoid(t) free of cancellation for well-classified rows.
        corr = (r.double() * (df.double() * (eps - eps / C - torch.sigmoid(t)) + eps / C)).to(acc)
        lse = lse.to(acc)  # the sweeps' statistics are fp32 (fp64 for float64 inputs)

        grad_x = grad_w = None
        if fused:
            gx_part, gw_part = pws * r[:, None], None
        else:
            gx_part, gw_part = torch.ops.bct_fast.softmax_grads(
                x, w, inv_nx, inv_nw, lab_eff, lse, r, scale, need_x, need_w, chunk_size, backend)
        if need_x:
            g = gx_part + corr[:, None] * wyh
            if wsum is not None:
                g = g - (r * (eps / C))[:, None] * wsum[None, :]
            grad_x = normalization_backward_rows(x, inv_nx, g).to(x_dtype)
        if need_w:
            K = gw_part
            K.index_add_(0, safe, corr[:, None] * xh)
            if wsum is not None:
                K.sub_(((eps / C) * (r[:, None] * xh).sum(0))[None, :])
            grad_w = normalization_backward_rows(w, inv_nw, K).to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None, None


def check_loss_options(*, scale: float, margin_type: str, margin: MarginValue, reduction: str = "mean",
                       label_smoothing: float = 0.0, arcface_grad: str = "exact") -> Margin:
    """Validate the loss hyperparameters (the loss modules call this at construction, so a bad
    value fails where it is set) and return the equivalent combined margin."""
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive number, got {scale!r}")
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    check_choice(arcface_grad, "arcface_grad", ("exact", "straight_through"))
    if not (isinstance(label_smoothing, numbers.Real) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
    return make_margin(margin_type, margin)


def cosine_margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    scale: float = 64.0,
    margin_type: str = "none",
    margin: MarginValue = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    arcface_grad: str = "exact",
    chunk_size: int | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Normalized-softmax cross-entropy with an optional CosFace / ArcFace / combined margin.

    ``loss_i = CE(scale * [cos(x_i, w_j) for j], y_i)`` with the target logit replaced by
    ``scale * f(cos)`` (see :mod:`bct_fast.ops.margins`). Embeddings and weight rows are
    L2-normalized inside the op and gradients flow through the normalization. The B x C logits
    are never materialized: a CUDA kernel streams class tiles (fp32/fp16/bf16 inputs, fp32
    accumulation), elsewhere a chunked PyTorch path does the same with bounded memory.

    A weight that does not require grad (the BCT influence loss's frozen old classifier) takes
    the one-pass path: the gradient of the embeddings is produced by the forward sweep.

    Args:
        embeddings: [B, d] float tensor.
        weight: [C, d] class rows (nn.Linear layout), same device; dtypes may differ (the op
            computes in the promoted dtype and returns each gradient in its input's dtype).
        labels: [B] integers in [0, C), or ``ignore_index``.
        scale: the logit scale s (> 0).
        margin_type: ``"none"`` (NormFace), ``"cosface"``, ``"arcface"`` (radians) or
            ``"combined"`` (margin = (m1, m2, m3)).
        reduction: ``"mean"`` over non-ignored rows (0 when every row is ignored), ``"sum"``,
            or ``"none"`` ([B], 0 at ignored rows).
        label_smoothing: as ``F.cross_entropy`` (over the margin logits).
        arcface_grad: ``"exact"`` or ``"straight_through"`` (insightface arcface_torch).
        chunk_size: classes per chunk on the PyTorch and epilogue paths (default: ~4M logits
            per chunk on a CPU, ~32M on the PyTorch path on a GPU, ~16M on the epilogue one).
        validate: check labels and finiteness (costs one host sync; off under torch.compile).
        backend: ``"auto"`` (on CUDA tensors the fastest verified provider that can serve the
            call: ``"fused"`` forward for bf16, ``"epilogue"`` for the rest of bf16 and fp32;
            else the chunked PyTorch path), ``"cuda"`` (the SIMT kernels, or an error saying
            why they cannot serve the call), ``"torch"``, ``"epilogue"`` (cuBLAS GEMMs on class
            chunks + our epilogue kernels; fp32 or bf16 inputs; on CPU tensors the same loop
            with the kernels' PyTorch twin) or ``"fused"`` (bf16 on CUDA)
            (:mod:`bct_fast.ops.providers`).

    Returns:
        fp32 loss (float64 for float64 inputs): a scalar, or [B] with ``reduction="none"``.
    """
    check_matrix(embeddings, "embeddings")
    check_matrix(weight, "weight")
    check_same_device(embeddings, "embeddings", weight, "weight")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight: has dim {weight.shape[1]} but embeddings have dim {embeddings.shape[1]}")
    check_labels(labels, "labels", embeddings.shape[0], embeddings.device)
    mg = check_loss_options(scale=scale, margin_type=margin_type, margin=margin, reduction=reduction,
                            label_smoothing=label_smoothing, arcface_grad=arcface_grad)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    check_backend(backend)
    if backend in ("cuda", "epilogue"):  # fail here, naming the argument, not inside the sweep
        dt = embeddings.new_empty(0, dtype=torch.promote_types(embeddings.dtype, weight.dtype))
        choose("margin_softmax", embeddings.device, backend, lambda: margin_softmax_cuda.unsupported(dt, dt),
               lambda: margin_softmax_epilogue.unsupported(dt, dt))
    # Grad mode is off inside Function.forward, so decide here whether a backward will follow.
    fuse_grad = torch.is_grad_enabled() and embeddings.requires_grad and not weight.requires_grad
    return CosineMarginCrossEntropyFunction.apply(
        embeddings, weight, labels, float(scale), mg, arcface_grad == "straight_through",
        reduction, int(ignore_index), float(label_smoothing), int(chunk_size or 0), validate,
        fuse_grad, backend)
