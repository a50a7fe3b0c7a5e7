"""Child process of tests/ops/test_bindings_emulated.py: runs the package's own CUDA-provider
glue (the ``native_*`` / ``_cuda_*`` functions that hand ``data_ptr()``s to ``bct_fast._C``)
on CPU tensors, against ``csrc/bindings.cpp`` built over the emulated launchers.

    python emulated_bindings_child.py MODULE_PATH CASE OUT_FILE [swap=NAME:I:J]

Everything between the package's Python and the kernels is the real code: the argument order
of each Python call, pybind11's conversions, each lambda's pointer casts and launcher call. The
only stand-ins are what a CPU process lacks: the stream (0), ``torch.cuda.device`` (no-op), the
SM count (2), and the "CUDA tensors only" guards of the fused and epilogue providers. Writes the case's inputs and
outputs with ``torch.save`` for the parent to check against float64.

``swap=NAME:I:J`` (the negative control) exchanges positional arguments I and J of every call
of the binding NAME, as a same-typed pointer swap in bindings.cpp would.
"""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_emulator as emu  # noqa: E402

from bct_fast.ops import margin_softmax_cuda as msc  # noqa: E402
from bct_fast.ops import margin_softmax_epilogue as mse  # noqa: E402
from bct_fast.ops import margin_softmax_fused as msf  # noqa: E402
from bct_fast.ops import topk_cuda as tkc  # noqa: E402
from bct_fast.ops import topk_epilogue as tke  # noqa: E402
from bct_fast.ops import topk_fused as tkf  # noqa: E402

PROVIDER_MODULES = (msc, mse, msf, tkc, tke, tkf)


class _Swapped:
    """The module with positional arguments i, j of one binding exchanged."""

    def __init__(self, mod, name: str, i: int, j: int):
        self._mod, self._name, self._i, self._j = mod, name, i, j

    def __getattr__(self, attr):
        fn = getattr(self._mod, attr)
        if attr != self._name:
            return fn

        def swapped(*args):
            args = list(args)
            args[self._i], args[self._j] = args[self._j], args[self._i]
            return fn(*args)
        return swapped


def install(mod) -> None:
    """Point the providers at ``mod`` and stand in for what a CPU process lacks."""
    for m in PROVIDER_MODULES:
        m.native = lambda: mod
        if hasattr(m, "stream_of"):
            m.stream_of = lambda t: 0
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=2)
    msf.unsupported = lambda x, w: None  # "CUDA tensors only": the one guard a CPU run must pass


# ---- inputs ------------------------------------------------------------------------------------

def loss_inputs(dtype: torch.dtype, B: int = 37, C: int = 300, d: int = 40, seed: int = 0):
    """Rows of uneven norms; half the rows' target class lies along the row, so that its logit
    dominates: a target column that is not left out, or the wrong one, moves lse by O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * torch.empty(B, 1).uniform_(0.5, 2.0, generator=g)
    w = torch.randn(C, d, generator=g) * torch.empty(C, 1).uniform_(0.5, 2.0, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[B // 2] = C - 1  # a target in the last class chunk
    near = torch.arange(0, B, 2)
    w[labels[near]] = x[near] * 1.5 + 0.05 * torch.randn(len(near), d, generator=g)
    labels[3] = -1  # an ignored row: no target column at all
    x, w = x.to(dtype), w.to(dtype)
    inv_nx = x.double().norm(dim=1).reciprocal().float()
    inv_nw = w.double().norm(dim=1).reciprocal().float()
    row_coef = torch.rand(B, generator=g) + 0.5
    row_coef[5] = 0.0  # a row whose coefficient is 0 (an ignored row in the backward)
    return dict(x=x, w=w, inv_nx=inv_nx, inv_nw=inv_nw, labels=labels, row_coef=row_coef, scale=16.0)


def search_inputs(dtype: torch.dtype, Q: int = 29, N: int = 333, d: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, d, generator=g) * torch.empty(Q, 1).uniform_(0.5, 2.0, generator=g)
    gal = torch.randn(N, d, generator=g) * torch.empty(N, 1).uniform_(0.5, 2.0, generator=g)
    return dict(q=q.to(dtype), g=gal.to(dtype))


def _lse_of(t: dict) -> torch.Tensor:
    """The full-softmax lse the backward sweeps take (float64 here: the glue casts it)."""
    xh = t["x"].double() * t["inv_nx"].double()[:, None]
    wh = t["w"].double() * t["inv_nw"].double()[:, None]
    return torch.logsumexp(t["scale"] * xh @ wh.T, dim=1)


# ---- cases: name -> () -> (inputs, outputs) -------------------------------------------------------

def _loss_args(t):
    return (t["x"], t["w"], t["inv_nx"], t["inv_nw"], t["labels"])


def margin_cuda_stats(dtype, with_pws):
    t = loss_inputs(dtype)
    lse, pws = msc.softmax_stats(*_loss_args(t), t["scale"], with_pws, sms=2)
    return t, dict(lse=lse, pws=pws)


def margin_cuda_grads(dtype):
    t = loss_inputs(dtype)
    t["lse"] = _lse_of(t)
    gx, gw = msc.softmax_grads(*_loss_args(t), t["lse"], t["row_coef"], t["scale"], True, True, sms=2)
    return t, dict(gx=gx, gw=gw)


def margin_epilogue_stats(dtype, with_pws):
    t = loss_inputs(dtype)
    lse, pws = mse.softmax_stats(*_loss_args(t), t["scale"], with_pws, chunk=128,
                                 epilogue=mse.CUDA_EPILOGUE)
    return t, dict(lse=lse, pws=pws)


def margin_epilogue_grads(dtype):
    t = loss_inputs(dtype)
    t["lse"] = _lse_of(t)
    gx, gw = mse.softmax_grads(*_loss_args(t), t["lse"], t["row_coef"], t["scale"], True, True,
                               chunk=128, epilogue=mse.CUDA_EPILOGUE)
    return t, dict(gx=gx, gw=gw)


def margin_fused_stats(dtype, with_pws):
    t = loss_inputs(dtype)
    lse, pws = msf.softmax_stats(*_loss_args(t), t["scale"], with_pws)
    return t, dict(lse=lse, pws=pws)


def topk_cuda_block(dtype, exclude):
    t = search_inputs(dtype)
    # query r is gallery row r (exclude) / the chunk's rows are numbered from 1000 (offsets)
    s, i = tkc.cosine_topk_block(t["q"], t["g"], 10, True, 0 if exclude else -1, 0 if exclude else 1000)
    return t, dict(scores=s, index=i)


def topk_epilogue_search(dtype, exclude):
    t = search_inputs(dtype)
    # CUDA_SELECTOR's function under another Selector: the identity check "CUDA tensors only"
    # is the guard a CPU run must pass
    selector = tke.Selector(tke.CUDA_SELECTOR.select, "cuda (emulated)")
    s, i = tke.cosine_topk_epilogue(t["q"], t["g"], 10, True, exclude, chunk_size=128,
                                    selector=selector, query_block=16, screen=False)
    return t, dict(scores=s, index=i)


def topk_fused_search(dtype, exclude):
    t = search_inputs(dtype)
    s, i = tkf.cosine_topk_fused(t["q"], t["g"], 10, True, exclude, chunk_size=128, query_block=16,
                                 launch=tkf.native_launch)
    return t, dict(scores=s, index=i)


def tile_checks(dtype):
    """The two one-warp tile checks, through the bindings directly (their Python wrappers insist
    on CUDA tensors)."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(16, 16, generator=g).to(dtype) for _ in range(2))
    c = torch.randn(16, 16, generator=g)
    mod = msf.native()
    outs = {}
    for name in ("margin_fused_mma_tile_check", "margin_fused_pv_tile_check"):
        out = torch.full((16, 16), float("nan"))
        getattr(mod, name)(a.data_ptr(), b.data_ptr(), c.data_ptr(), out.data_ptr(), 0)
        outs[name] = out
    return dict(a=a, b=b, c=c), outs


def _launch_at_limit(run, need: int) -> torch.Tensor:
    """[ran with exactly ``need`` bytes allowed, refused with one byte less (and said why)]."""
    import os

    out = []
    for limit in (need, need - 1):
        os.environ["BCT_EMU_OPTIN_SMEM"] = str(limit)
        try:
            run()
            out.append(limit == need)
        except RuntimeError as e:
            out.append(limit < need and "more than this device allows" in str(e))
        finally:
            del os.environ["BCT_EMU_OPTIN_SMEM"]
    return torch.tensor(out)


def smem_limits():
    """Each fused launcher against device_limits' byte counts (the device's opt-in limit set
    through the emulated runtime)."""
    from bct_fast.ops import device_limits as dl

    outs = {}
    t = search_inputs(BF16)
    for k in (10, 50, 100):
        outs[f"topk_fused_k{k}"] = _launch_at_limit(
            lambda k=k: tkf.cosine_topk_fused(t["q"], t["g"], k, True, False, launch=tkf.native_launch),
            dl.TOPK_FUSED_SMEM[dl.topk_fused_kmax(k)])
    lt = loss_inputs(BF16)
    outs["margin_fused_lse"] = _launch_at_limit(
        lambda: msf.softmax_stats(*_loss_args(lt), lt["scale"], False), dl.MARGIN_FUSED_LSE_SMEM)
    for d in (40, 100, 200, 300):
        lt = loss_inputs(BF16, B=9, C=70, d=d)
        outs[f"margin_fused_pws_d{d}"] = _launch_at_limit(
            lambda lt=lt: msf.softmax_stats(*_loss_args(lt), lt["scale"], True), dl.margin_fused_pws_smem(d))
    return {}, outs


BF16, F32 = torch.bfloat16, torch.float32
CASES = {
    "margin_cuda_stats_f32": lambda: margin_cuda_stats(F32, False),
    "margin_cuda_stats_pws_bf16": lambda: margin_cuda_stats(BF16, True),
    "margin_cuda_grads_f32": lambda: margin_cuda_grads(F32),
    "margin_epilogue_stats_pws_f32": lambda: margin_epilogue_stats(F32, True),
    "margin_epilogue_stats_bf16": lambda: margin_epilogue_stats(BF16, False),
    "margin_epilogue_grads_bf16": lambda: margin_epilogue_grads(BF16),
    "margin_epilogue_grads_f32": lambda: margin_epilogue_grads(F32),
    "margin_fused_stats_bf16": lambda: margin_fused_stats(BF16, False),
    "margin_fused_stats_pws_bf16": lambda: margin_fused_stats(BF16, True),
    "topk_cuda_f32_offsets": lambda: topk_cuda_block(F32, False),
    "topk_cuda_bf16_exclude": lambda: topk_cuda_block(BF16, True),
    "topk_epilogue_f32_exclude": lambda: topk_epilogue_search(F32, True),
    "topk_epilogue_bf16": lambda: topk_epilogue_search(BF16, False),
    "topk_fused_bf16_exclude": lambda: topk_fused_search(BF16, True),
    "topk_fused_bf16": lambda: topk_fused_search(BF16, False),
    "tile_checks_bf16": lambda: tile_checks(BF16),
    "smem_limits": smem_limits,
}


def main(argv: list[str]) -> None:
    path, case, out = argv[:3]
    mod = emu.load_bindings(Path(path))
    for opt in argv[3:]:
        name, i, j = opt.removeprefix("swap=").split(":")
        mod = _Swapped(mod, name, int(i), int(j))
    install(mod)
    inputs, outputs = CASES[case]()
    torch.save({"inputs": inputs, "outputs": outputs}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
