"""Model-parallel classifier and sharded gallery search on ``torch.distributed``.

Runs over any process group: NCCL on GPUs, gloo on CPU. Each rank holds a contiguous slice of
the class weights (``shard_range``) or of the gallery; nothing is approximated. Under NCCL each
rank must have called ``torch.cuda.set_device(local_rank)`` (torchrun's usual setup): the object
collectives of :func:`save_gallery_shard` run on the current device, and ranks sharing cuda:0
make NCCL fail.

- :class:`ShardedCosineMarginLoss`: EXACT model-parallel normalized-softmax margin loss (like
  insightface's PartialFC with sample_rate = 1). Embeddings and labels of the data-parallel
  backbone are all-gathered; every rank sweeps its class slice with the fused op's primitives
  and the per-row max / sum-exp / target cosine are all-reduced, so the backward pass of every
  rank uses the global log-sum-exp. A frozen slice (``trainable=False``) is the sharded BCT
  influence loss.
- :func:`distributed_topk`: exact top-k of the (replicated) queries against the union of the
  ranks' gallery shards, with global gallery indices.
- :func:`save_gallery_shard` / :func:`load_gallery_shard`: one ``GalleryIndex`` file per rank
  plus a manifest, written atomically.

Gradient scale: every rank returns the loss of the GLOBAL batch. Backpropagating it gives each
rank d(loss)/d(its own embeddings) and d(loss)/d(its class slice), exactly. DistributedDataParallel
then AVERAGES backbone gradients over ranks, i.e. divides them by the world size relative to
the classifier's; multiply the loss by ``world_size`` for the backbone (or scale the classifier
learning rate) if you want the single-process gradient everywhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bct_fast._core.autocast import without_autocast
from bct_fast._core.checks import check_labels, check_matrix
from bct_fast._core.io import atomic_write
from bct_fast.ops import (MarginValue, check_loss_options, cosine_topk, inv_row_norms,
                          normalization_backward_rows, target_function, topk_lowest_index_ties)

__all__ = ["shard_range", "ShardedCosineMarginLoss", "sharded_cosine_margin_cross_entropy",
           "distributed_topk", "save_gallery_shard", "load_gallery_shard"]


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (call dist.init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of ``total`` items owned by ``rank`` (sizes differ by <= 1)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_gather_rows(t: Tensor, group) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's rows (row counts may differ); returns (all rows, counts)."""
    _, world = _world(group)
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    width = max(counts)
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


class _ShardedMarginCE(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x_local, w_shard, labels_local, class_start, scale, margin,
                straight_through, group, chunk_size):
        rank, world = _world(group)
        dt = torch.promote_types(x_local.dtype, w_shard.dtype)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        x, counts = _all_gather_rows(x_local.detach().to(dt), group)
        labels, _ = _all_gather_rows(labels_local.to(torch.int64), group)
        w = w_shard.detach().to(dt)
        C_local = w.shape[0]
        inv_nx, inv_nw = inv_row_norms(x, acc), inv_row_norms(w, acc)
        xh = x.to(acc) * inv_nx[:, None]
        local = (labels >= class_start) & (labels < class_start + C_local)
        safe = torch.where(local, labels - class_start, torch.zeros_like(labels))
        wyh = w[safe].to(acc) * inv_nw[safe][:, None] * local[:, None]
        # The owner rank of each row's target computes its cosine; a sum all-reduce shares it.
        cos_y = (xh * wyh).sum(1)
        dist.all_reduce(cos_y, group=group)
        f, df = target_function(cos_y, margin, straight_through)
        z_y = scale * f
        lab_local = torch.where(local, safe, torch.full_like(safe, -1))
        # Per rank: the log-sum-exp (float64) of the row's logits in this slice except its target.
        rest_local, _ = torch.ops.bct_fast.softmax_stats(x, w, inv_nx, inv_nw, lab_local, scale, False,
                                                         chunk_size)
        # Over all ranks, then combined with the target logit in float64 (t = rest - z_y: loss
        # log(1 + e^t), p_y - 1 = -sigmoid(t), no cancellation for well-classified rows).
        m = rest_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_ref = torch.where(torch.isneginf(m), 0.0, m)  # no class but the target anywhere: -inf
        s = torch.exp(rest_local - m_ref)
        dist.all_reduce(s, group=group)
        z64 = z_y.to(torch.float64)
        t = m_ref + torch.log(s) - z64
        lse = torch.logaddexp(t, torch.zeros_like(t)) + z64
        rows = torch.logaddexp(t, torch.zeros_like(t)).to(acc)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("embeddings or weight: the loss is not finite (NaN/inf in an input on some rank)")
        loss = rows.mean()
        ctx.save_for_backward(x, w, inv_nx, inv_nw, xh, wyh, lab_local, safe, local, df, lse, t)
        offset = sum(counts[:rank])
        ctx.cfg = (scale, chunk_size, group, offset, x_local.shape[0], x_local.dtype, w_shard.dtype)
        return loss  # already in acc; no no-op .to() (see CosineMarginCrossEntropyFunction.forward)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @without_autocast
    def backward(ctx, grad_out):
        x, w, inv_nx, inv_nw, xh, wyh, lab_local, safe, local, df, lse, t = ctx.saved_tensors
        scale, chunk_size, group, offset, b_local, x_dtype, w_dtype = ctx.cfg
        need_x, need_w = ctx.needs_input_grad[:2]
        acc = inv_nx.dtype
        B = x.shape[0]
        r = (grad_out.to(acc) / B * scale).expand(B).contiguous()
        # The target column (left out of the sweeps): f'(c_y) (p_y - 1), p_y - 1 = -sigmoid(t).
        corr = (-r.double() * df.double() * torch.sigmoid(t)).to(acc)
        gx_part, gw_part = torch.ops.bct_fast.softmax_grads(
            x, w, inv_nx, inv_nw, lab_local, lse.to(acc), r, scale, True, need_w, chunk_size)
        grad_x = grad_w = None
        # Sum the class-slice contributions of all ranks (the owner adds the target correction).
        g = gx_part + (corr * local)[:, None] * wyh
        dist.all_reduce(g, group=group)
        if need_x:
            rows = slice(offset, offset + b_local)
            grad_x = normalization_backward_rows(x[rows], inv_nx[rows], g[rows].clone()).to(x_dtype)
        if need_w:
            K = gw_part
            K.index_add_(0, safe[local], corr[local][:, None] * xh[local])
            grad_w = normalization_backward_rows(w, inv_nw, K).to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None


def sharded_cosine_margin_cross_entropy(embeddings: Tensor, weight_shard: Tensor, labels: Tensor, *,
                                        class_start: int, num_classes: int, scale: float = 64.0,
                                        margin_type: str = "none", margin: MarginValue = 0.0,
                                        arcface_grad: str = "exact", group=None,
                                        chunk_size: int | None = None) -> Tensor:
    """Mean loss over the GLOBAL batch (all ranks' rows), with this rank's class slice
    ``weight_shard`` = rows [class_start, class_start + len) of the [num_classes, d] classifier.
    Equal to :func:`bct_fast.ops.cosine_margin_cross_entropy` on the concatenated batch and
    weights (reduction="mean"; label smoothing and ignore_index are not supported here)."""
    check_matrix(embeddings, "embeddings")
    check_matrix(weight_shard, "weight_shard")
    if weight_shard.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight_shard: dim {weight_shard.shape[1]} != embeddings dim {embeddings.shape[1]}")
    check_labels(labels, "labels", embeddings.shape[0], embeddings.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: values must lie in [0, {num_classes})")
    mg = check_loss_options(scale=scale, margin_type=margin_type, margin=margin, arcface_grad=arcface_grad)
    return _ShardedMarginCE.apply(embeddings, weight_shard, labels, int(class_start), float(scale), mg,
                                  arcface_grad == "straight_through", group, int(chunk_size or 0))


class ShardedCosineMarginLoss(nn.Module):
    """Model-parallel classifier loss: this rank stores rows ``shard_range(num_classes, rank,
    world)`` of the class weight. ``trainable=False`` makes the slice a frozen buffer (the
    sharded BCT influence loss; load the old classifier's rows with :meth:`load_full_weight`).

    Call as ``loss(local_embeddings, local_labels)`` on every rank (labels are global class ids)."""

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0, margin_type: str = "none",
                 margin: MarginValue = 0.0, arcface_grad: str = "exact", trainable: bool = True, group=None):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
        check_loss_options(scale=scale, margin_type=margin_type, margin=margin, arcface_grad=arcface_grad)
        rank, world = _world(group)
        self.num_classes, self.group = num_classes, group
        self.class_start, self.class_end = shard_range(num_classes, rank, world)
        w = torch.empty(self.class_end - self.class_start, embedding_size)
        nn.init.normal_(w, std=0.01)
        if trainable:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        self.kwargs = dict(scale=scale, margin_type=margin_type, margin=margin, arcface_grad=arcface_grad)

    @torch.no_grad()
    def load_full_weight(self, full: Tensor) -> None:
        """Copy this rank's rows out of the full [num_classes, d] weight."""
        if full.shape != (self.num_classes, self.weight.shape[1]):
            raise ValueError(f"full: expected shape {(self.num_classes, self.weight.shape[1])}, got {tuple(full.shape)}")
        self.weight.copy_(full[self.class_start:self.class_end])

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return sharded_cosine_margin_cross_entropy(embeddings, self.weight, labels, class_start=self.class_start,
                                                   num_classes=self.num_classes, group=self.group, **self.kwargs)


def distributed_topk(queries: Tensor, local_gallery: Tensor, k: int, group=None, *, normalize: bool = True,
                     chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact global top-k: ``queries`` (the same on every rank) against the union of the ranks'
    gallery shards, in rank order. Returns (scores [Q, k], GLOBAL indices [Q, k]) on every
    rank, ties to the lower global index."""
    rank, world = _world(group)
    check_matrix(queries, "queries")
    out_device = queries.device
    # A GPU shard searched with host queries: the search and the collectives run on the GPU
    # (NCCL has no CPU tensors); the results come back to the queries' device.
    if local_gallery.is_cuda and not queries.is_cuda:
        queries = queries.to(local_gallery.device)
    n_local = local_gallery.shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64, device=queries.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=queries.device), group=group)
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k: expected an integer in [1, {total}] (global gallery size), got {k!r}")
    Q = queries.shape[0]
    s = torch.full((Q, k), -math.inf, dtype=torch.float32, device=queries.device)
    i = torch.full((Q, k), -1, dtype=torch.int64, device=queries.device)
    if n_local:
        kk = min(k, n_local)
        s[:, :kk], i[:, :kk] = cosine_topk(queries, local_gallery, kk, normalize=normalize, chunk_size=chunk_size)
        i[:, :kk] += sum(sizes[:rank])
    all_s = [torch.empty_like(s) for _ in range(world)]
    all_i = [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(all_s, s, group=group)
    dist.all_gather(all_i, i, group=group)
    # Shards are contiguous in rank order, so column order among equal scores is index order.
    top, cols = topk_lowest_index_ties(torch.cat(all_s, 1), k)
    return top.to(out_device), torch.cat(all_i, 1).gather(1, cols).to(out_device)


_MANIFEST_FORMAT = "bct_fast sharded gallery v1"
_MANIFEST_KEYS = {"world_size", "rows", "model_version", "format"}


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.bctidx"


def _group_src(group, rank: int = 0) -> int:
    """The global rank of ``rank`` in ``group`` (what broadcast's ``src`` wants)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _raise_if_any_failed(errors: list, what: str) -> None:
    """Every rank raises the same error when one rank failed (none is left in a collective)."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise RuntimeError(f"save_gallery_shard: {what} failed on {len(failed)} rank(s): {detail}")


def save_gallery_shard(index, folder: str | Path, group=None) -> Path:
    """Every rank writes its ``GalleryIndex`` as ``shard-RRRRR-of-WWWWW.bctidx``; rank 0 then
    writes ``manifest.json`` (world size, row counts, model version). Atomic per file. A shard
    may be empty (0 rows).

    Collective: call it on every rank. If the save fails on any rank (or the ranks hold
    different model versions), EVERY rank raises (RuntimeError / ValueError naming the ranks
    and their errors) instead of leaving the others blocked in a collective."""
    rank, world = _world(group)
    folder = Path(folder)
    path = folder / _shard_name(rank, world)
    mine: tuple = (None, 0, None)
    try:
        index.save(path)
        mine = (None, len(index), index.model_version)
    except Exception as e:  # reported to every rank below
        mine = (f"{type(e).__name__}: {e}", 0, None)
    info: list = [None] * world
    dist.all_gather_object(info, mine, group=group)
    _raise_if_any_failed([e for e, _, _ in info], "writing the shard")
    versions = sorted({v for _, _, v in info})
    if len(versions) != 1:
        raise ValueError(f"index: ranks hold different model versions {versions}")
    status: list = [None]
    if rank == 0:
        manifest = json.dumps({"world_size": world, "rows": [n for _, n, _ in info],
                               "model_version": versions[0], "format": _MANIFEST_FORMAT}).encode()
        try:
            atomic_write(folder / "manifest.json", lambda f: f.write(manifest))
        except Exception as e:
            status = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(status, src=_group_src(group), group=group)
    _raise_if_any_failed([status[0]], "writing manifest.json (rank 0)")
    return path


def _read_manifest(folder: Path) -> dict:
    """manifest.json, schema-checked; IndexFileError naming the file for anything malformed."""
    from bct_fast.gallery import IndexFileError

    file = folder / "manifest.json"
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no manifest.json (not a sharded gallery folder)") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IndexFileError(f"{file}: unreadable manifest (truncated or corrupted: {e})") from None
    ok = (type(m) is dict and set(m) == _MANIFEST_KEYS and m["format"] == _MANIFEST_FORMAT
          and type(m["world_size"]) is int and m["world_size"] >= 1
          and type(m["rows"]) is list and len(m["rows"]) == m["world_size"]
          and all(type(n) is int and n >= 0 for n in m["rows"])
          and type(m["model_version"]) is str and m["model_version"])
    if not ok:
        raise IndexFileError(f"{file}: inconsistent manifest {m!r:.200}")
    return m


def load_gallery_shard(folder: str | Path, group=None, **load_kwargs):
    """This rank's shard of a :func:`save_gallery_shard` folder; checks the manifest (format,
    world size, row count, model version). Not collective: each rank reads its own files.

    Raises:
        FileNotFoundError (no manifest or shard); ValueError when the world size differs;
        IndexFileError (a ValueError) for a malformed manifest or shard, naming the file."""
    from bct_fast.gallery import GalleryIndex, IndexFileError

    rank, world = _world(group)
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest["world_size"] != world:
        raise ValueError(f"{folder}: saved by {manifest['world_size']} ranks, loading with {world}")
    path = folder / _shard_name(rank, world)
    index = GalleryIndex.load(path, **load_kwargs)
    if len(index) != manifest["rows"][rank] or index.model_version != manifest["model_version"]:
        raise IndexFileError(f"{path}: shard {rank} does not match {folder / 'manifest.json'} "
                             f"({len(index)} rows of {index.model_version!r}, manifest: "
                             f"{manifest['rows'][rank]} rows of {manifest['model_version']!r})")
    return index
