"""The top-k selection kernel (csrc/cuda/topk_epilogue*) on the CPU emulator (csrc/emulator/),
against its PyTorch twin (bct_fast.ops.topk_epilogue_torch), bit for bit. No GPU needed.

Each case runs the library's launcher under several thread-schedule seeds (bit-identical outputs
required; shared-memory race check, guard pages behind every buffer) on score blocks as the chunk
loop of bct_fast.ops.topk_epilogue hands them over: a first block into empty lists (many
candidates: the radix-select path), then a block into full lists (few candidates: the
threshold-filter path). The last tests run that chunk loop itself with the emulated kernel
injected as its selector.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kernel_emulator as emu
from bct_fast.ops import topk_epilogue as tke
from bct_fast.ops import topk_epilogue_torch as twin

pytestmark = pytest.mark.emulated

SEEDS = (1, 2, 3)


@pytest.fixture(scope="session", autouse=True)
def _built():
    emu.require_built()


def emu_select(scores, inv_nq, inv_ng, k, n0, exclude, self_col0, run_s, run_i, nonfinite,
               seeds=SEEDS, variant=None) -> None:
    """The selector contract (topk_epilogue_torch.select_block) through the emulated launcher."""
    rows, cols = scores.shape
    arrays = dict(scores=scores.numpy(), run_s=run_s.numpy(), run_i=run_i.numpy(),
                  nonfinite=nonfinite.numpy(),
                  inv_nq=None if inv_nq is None else inv_nq.numpy(),
                  inv_ng=None if inv_ng is None else inv_ng.numpy())
    out = emu.run("topk_select", arrays, dict(rows=rows, cols=cols, k=k, n0=n0, exclude=exclude,
                                              self_col0=self_col0), seeds=seeds, variant=variant)
    run_s.copy_(torch.from_numpy(np.frombuffer(out["run_s"], np.float32).reshape(rows, k).copy()))
    run_i.copy_(torch.from_numpy(np.frombuffer(out["run_i"], np.int64).reshape(rows, k).copy()))
    nonfinite.copy_(torch.from_numpy(np.frombuffer(out["nonfinite"], np.int32).copy()))


EMU_SELECTOR = tke.Selector(emu_select, "emulated")


def kcap(k):
    """The kernel's candidate buffer for k (the dispatch of csrc/cuda/topk_epilogue.cu)."""
    return next(c for c in (64, 256, 1024, 2048, 4096) if k <= c)


def empty_lists(rows, k):
    return torch.full((rows, k), -math.inf), torch.full((rows, k), -1, dtype=torch.int64)


def both(scores, k, n0, lists, inv_nq=None, inv_ng=None, exclude=False, self_col0=0, kernel=emu_select):
    """Run kernel and twin on the same block and lists; assert bit-equal; return the new lists."""
    out = []
    for fn in (kernel, twin.select_block):
        s, i = lists[0].clone(), lists[1].clone()
        flag = torch.zeros(1, dtype=torch.int32)
        fn(scores, inv_nq, inv_ng, k, n0, exclude, self_col0, s, i, flag)
        out.append((s, i, flag))
    (ks, ki, kf), (ts, ti, tf) = out
    assert np.array_equal(ks.numpy().view(np.uint32), ts.numpy().view(np.uint32))
    assert torch.equal(ki, ti)
    assert kf.item() == tf.item()
    return ks, ki, kf.item()


@pytest.mark.parametrize("k", [1, 7, 64, 256, 257, 1000, 4096])
def test_first_then_steady_blocks(k):
    """Empty lists + a block wider than the candidate buffer (radix select), then a second block
    into the full lists (threshold filter + merge); inverse norms on one side each."""
    rng = np.random.default_rng(k)
    rows, cols = 3, 2 * kcap(k) + 37  # more candidates than the buffer holds: radix select
    a = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    inv_ng = torch.from_numpy(rng.uniform(0.5, 2, cols).astype(np.float32))
    lists = both(a, k, 0, empty_lists(rows, k), inv_ng=inv_ng)[:2]
    assert (lists[1] >= 0).all()
    b = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 1.2)
    inv_nq = torch.from_numpy(rng.uniform(0.5, 2, rows).astype(np.float32))
    both(b, k, cols, lists, inv_nq=inv_nq)


@pytest.mark.parametrize("k", [7, 257])
def test_ties_and_signed_zeros(k):
    """Values in {-1, -0, 0, 1}: the radix select runs into the position bits; equal scores go
    to the list first, then to the lower column."""
    rng = np.random.default_rng(k + 1)
    rows, cols = 2, 2 * kcap(k) + 5
    vals = np.array([-1.0, -0.0, 0.0, 1.0], np.float32)
    a = torch.from_numpy(vals[rng.integers(0, 4, (rows, cols))])
    lists = both(a, k, 0, empty_lists(rows, k))[:2]
    b = torch.from_numpy(vals[rng.integers(0, 4, (rows, cols))])
    both(b, k, cols, lists)


@pytest.mark.parametrize("k", [5, 300])
def test_exclude_self_nonfinite_and_all_minus_inf(k):
    """Row 0: its own column and a NaN (flagged, never selected); row 1: all -inf (flagged, list
    unchanged); row 2: own column outside the block; partly filled lists."""
    rng = np.random.default_rng(9)
    rows, cols = 3, 420
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    a[0, 17] = np.nan
    a[1] = -np.inf
    lists = empty_lists(rows, k)
    lists[0][:, :2] = torch.tensor([5.0, 4.0])
    lists[1][:, :2] = torch.tensor([-3, -7])[None, :].abs()  # indices 3, 7 (below n0)
    s, i, flag = both(torch.from_numpy(a), k, 1000, lists, exclude=True, self_col0=cols - 2)
    assert flag == 1
    own = 1000 + cols - 2 + torch.arange(rows)[:, None]
    assert not (i == own).any() and not (i[0] == 1000 + 17).any()
    assert torch.equal(i[1, :2], torch.tensor([3, 7])) and (i[1, 2:] == -1).all()


def test_few_candidates_into_full_lists():
    """Steady state: the lists already hold better scores; only a handful beat the k-th."""
    rng = np.random.default_rng(2)
    k, rows, cols = 64, 4, 2000
    s0 = -np.sort(-rng.uniform(2.0, 3.0, (rows, k)).astype(np.float32), axis=1)
    lists = (torch.from_numpy(s0), torch.arange(k).repeat(rows, 1))
    a = rng.uniform(-1, 2.02, (rows, cols)).astype(np.float32)
    a[:, 5] = s0[:, 10]  # a tie with a list entry: the list keeps its place
    both(torch.from_numpy(a), k, 5000, lists)


@pytest.mark.parametrize("normalize,exclude_self", [(True, False), (False, True)])
def test_chunk_loop_with_emulated_kernel(normalize, exclude_self):
    """The provider's loop with the emulated selector equals the loop with the twin."""
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(700, 16, generator=gen)
    q = g[:5].clone() if exclude_self else torch.randn(5, 16, generator=gen)
    kw = dict(k=300, normalize=normalize, exclude_self=exclude_self, chunk_size=256, query_block=3)
    got = tke.cosine_topk_epilogue(q, g, selector=EMU_SELECTOR, **kw)
    ref = tke.cosine_topk_epilogue(q, g, selector=tke.TORCH_SELECTOR, **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_broken_tie_order_is_caught():
    """Self-test of this harness: a kernel built with ties going to the higher index
    (BCT_FAST_EMU_BREAK_TIE_ORDER) disagrees with the twin on tie-heavy data."""
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.integers(-1, 2, (2, 300)).astype(np.float32))

    def broken(*args):
        emu_select(*args, seeds=(1,), variant="tie_order")

    with pytest.raises(AssertionError):
        both(a, 7, 0, empty_lists(2, 7), kernel=broken)
