"""torch.distributed (gloo, 2 CPU processes): the sharded loss and search equal the
single-process ops on the concatenated weights / gallery."""
import functools
import json
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank, world, init_file, out_dir, case):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = case(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks are done communicating
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    # Skip gloo's teardown at interpreter exit: torch's gloo process group occasionally aborts
    # there ("terminate called without an active exception") after all work has finished.
    sys.stdout.flush()
    os._exit(0)


def run_world(tmp_path, case):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, WORLD, str(tmp_path / "init"), str(tmp_path), case))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def global_problem(seed=0, B=(5, 3), C=23, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(B), d, generator=g, dtype=torch.float64)
    w = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (sum(B),), generator=g)
    return x, w, y, B


def loss_case(rank, world, margin_type, margin, trainable):
    from bct_fast.distributed import ShardedCosineMarginLoss
    x, w, y, B = global_problem()
    b0 = sum(B[:rank])
    xl = x[b0:b0 + B[rank]].clone().requires_grad_(True)
    loss_mod = ShardedCosineMarginLoss(w.shape[0], w.shape[1], scale=16.0, margin_type=margin_type,
                                       margin=margin, trainable=trainable).double()
    loss_mod.load_full_weight(w)
    loss = loss_mod(xl, y[b0:b0 + B[rank]])
    loss.backward()
    gw = loss_mod.weight.grad if trainable else None
    return {"loss": loss.detach(), "gx": xl.grad, "gw": gw, "start": loss_mod.class_start,
            "end": loss_mod.class_end}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("margin_type,margin,trainable", [("none", 0.0, True), ("arcface", 0.3, True),
                                                          ("cosface", 0.2, False)])
def test_sharded_loss_equals_single_process(tmp_path, margin_type, margin, trainable):
    from bct_fast.ops import cosine_margin_cross_entropy
    out = run_world(tmp_path, functools.partial(loss_case, margin_type=margin_type, margin=margin,
                                                trainable=trainable))
    x, w, y, B = global_problem()
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(trainable)
    ref = cosine_margin_cross_entropy(x, w, y, scale=16.0, margin_type=margin_type, margin=margin)
    ref.backward()
    b0 = 0
    for rank, r in enumerate(out):
        assert torch.allclose(r["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(r["gx"], x.grad[b0:b0 + B[rank]], rtol=1e-9, atol=1e-12)
        if trainable:
            assert torch.allclose(r["gw"], w.grad[r["start"]:r["end"]], rtol=1e-9, atol=1e-12)
        b0 += B[rank]
    assert out[0]["end"] == out[1]["start"] and out[1]["end"] == w.shape[0]


def search_case(rank, world):
    from bct_fast.distributed import distributed_topk, load_gallery_shard, save_gallery_shard, shard_range
    from bct_fast.gallery import GalleryIndex
    g = torch.Generator().manual_seed(1)
    gallery = torch.randint(-2, 3, (101, 6), generator=g).float()  # many exact ties
    queries = torch.randint(-2, 3, (9, 6), generator=g).float()
    a, b = shard_range(101, rank, world)
    res = {k: distributed_topk(queries, gallery[a:b], k, normalize=False) for k in (1, 10, 101)}
    index = GalleryIndex(6, "old-v1")
    index.add(gallery[a:b], ids=torch.arange(a, b))
    folder = os.environ["BCT_TEST_SHARD_DIR"]
    save_gallery_shard(index, folder)
    back = load_gallery_shard(folder)
    res["reloaded_ids"] = back.ids
    return res


def test_distributed_topk_and_sharded_gallery(tmp_path, monkeypatch):
    from bct_fast.search import cosine_topk
    monkeypatch.setenv("BCT_TEST_SHARD_DIR", str(tmp_path / "shards"))
    out = run_world(tmp_path, search_case)
    g = torch.Generator().manual_seed(1)
    gallery = torch.randint(-2, 3, (101, 6), generator=g).float()
    queries = torch.randint(-2, 3, (9, 6), generator=g).float()
    for k in (1, 10, 101):
        s, i = cosine_topk(queries, gallery, k, normalize=False)
        for r in out:
            assert torch.equal(r[k][1], i) and torch.allclose(r[k][0], s)
    assert torch.equal(torch.cat([r["reloaded_ids"] for r in out]), torch.arange(101))
    assert (tmp_path / "shards" / "manifest.json").exists()


def _expect_error(fn, error) -> str:
    try:
        fn()
    except error as e:
        return str(e)
    return "NO ERROR"


def shard_edge_case(rank, world):
    """An empty shard; failures on one rank raise on every rank (no rank left in a collective);
    a truncated manifest is a file error naming it."""
    from pathlib import Path

    from bct_fast.distributed import load_gallery_shard, save_gallery_shard
    from bct_fast.gallery import GalleryIndex, IndexFileError
    folder = Path(os.environ["BCT_TEST_SHARD_DIR"])
    out = {}
    index = GalleryIndex(6, "old-v1")
    if rank == 0:
        index.add(torch.randn(7, 6), ids=torch.arange(7))
    save_gallery_shard(index, folder / "empty")
    out["rows"] = len(load_gallery_shard(folder / "empty", mmap=True))
    other = GalleryIndex(6, "old-v1" if rank == 0 else "other-v2")
    out["versions"] = _expect_error(lambda: save_gallery_shard(other, folder / "versions"), ValueError)
    if rank == 1:  # a directory where rank 1's file must go: its save fails
        (folder / "blocked" / "shard-00001-of-00002.bctidx").mkdir(parents=True)
    dist.barrier()
    out["blocked"] = _expect_error(lambda: save_gallery_shard(index, folder / "blocked"), RuntimeError)
    dist.barrier()
    if rank == 0:
        manifest = folder / "empty" / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:-7])
    dist.barrier()
    out["manifest"] = _expect_error(lambda: load_gallery_shard(folder / "empty"), IndexFileError)
    return out


def test_empty_shard_and_failures_on_one_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("BCT_TEST_SHARD_DIR", str(tmp_path / "shards"))
    out = run_world(tmp_path, shard_edge_case)  # a hang fails the join's timeout
    assert [r["rows"] for r in out] == [7, 0]
    for r in out:
        assert "different model versions" in r["versions"]
        assert "rank 1" in r["blocked"] and "shard-00001-of-00002.bctidx" in r["blocked"]
        assert "manifest.json" in r["manifest"] and "unreadable manifest" in r["manifest"]


def test_manifest_is_schema_checked(tmp_path):
    from bct_fast.distributed import _read_manifest
    from bct_fast.gallery import IndexFileError
    good = {"world_size": 2, "rows": [3, 0], "model_version": "m", "format": "bct_fast sharded gallery v1"}
    file = tmp_path / "manifest.json"
    file.write_text(json.dumps(good))
    assert _read_manifest(tmp_path) == good
    bad = [dict(good, rows=[3]), dict(good, rows=[3, -1]), dict(good, rows=[3, 1.0]), dict(good, world_size=True),
           dict(good, format="other"), dict(good, model_version=""), dict(good, extra=1), [good]]
    for m in bad:
        file.write_text(json.dumps(m))
        with pytest.raises(IndexFileError, match="manifest.json: inconsistent"):
            _read_manifest(tmp_path)
    for cut in range(len(json.dumps(good))):
        file.write_text(json.dumps(good)[:cut])
        with pytest.raises(IndexFileError, match="manifest.json"):
            _read_manifest(tmp_path)
    file.unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        _read_manifest(tmp_path)


def test_not_initialized_is_a_clear_error():
    from bct_fast.distributed import distributed_topk
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_topk(torch.randn(2, 3), torch.randn(4, 3), 1)


@pytest.mark.parametrize("kw,match", [(dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"),
                                      (dict(arcface_grad="ste"), "arcface_grad"),
                                      (dict(margin_type="arcface", margin=4.0), "margin")])
def test_sharded_loss_checks_its_options_before_any_communication(kw, match):
    from bct_fast.distributed import ShardedCosineMarginLoss, sharded_cosine_margin_cross_entropy
    with pytest.raises(ValueError, match=match):
        ShardedCosineMarginLoss(10, 4, **kw)
    with pytest.raises(ValueError, match=match):
        sharded_cosine_margin_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 1, 2]),
                                            class_start=0, num_classes=10, **kw)
