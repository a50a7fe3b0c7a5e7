"""Fused margin cross-entropy vs the naive PyTorch formulation (normalize, matmul, margin,
F.cross_entropy), fwd and fwd+bwd, trainable and frozen (influence-loss) classifier.

Axes: provider x mode (forward | full) x classifier (trainable | frozen). Providers: on CPU
``bct_fast`` (the chunked path) and ``torch`` (naive); on CUDA ``bct_fast_cuda`` (the kernels,
``backend="cuda"``), ``bct_fast_epilogue`` (cuBLAS GEMMs on class chunks + our epilogue kernels,
``backend="epilogue"``), ``bct_fast_fused`` (tensor-core tiles with the forward statistics in
registers, backward = the epilogue's; bf16 only, ``backend="fused"``), ``bct_fast_torch`` (the chunked path on cuBLAS,
``backend="torch"``), ``bct_fast_auto`` (the default: whatever ``backend="auto"`` picks with this
checkout's gpu_verified.json), ``torch``, and the fused linear cross-entropy
peers where their wheels are installed (benchmarks/fetch_gpu_wheels.sh carries them to the offline
GPU machine): ``liger`` (Liger-Kernel's ``liger_fused_linear_cross_entropy``) and ``cce`` (Cut
Cross-Entropy's ``linear_cross_entropy``, its default gradient filter). The peers have no margin:
they get ``scale * normalize(x)`` and ``normalize(w)`` (normalization inside the timed step, as
ours does it), so they do the same two (forward) or four (fwd+bwd) GEMMs and softmax work, less
the target-column margin, which costs O(B d).
Shapes on CPU: ``CPU_QUICK`` by default, ``CPU_FULL`` with ``--full`` (benchmarks/conftest.py).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bct_fast.ops import cosine_margin_cross_entropy

D = 512
SCALE, MARGIN = 64.0, 0.35
# (B, C). The naive torch path at B=1024, C=200k takes ~100 s over its 8 cases (3.5 GB logits),
# so only --full runs it; the mid shape (an eighth of the work) shows the trend by default.
CPU_FULL = [(256, 10_000), (512, 50_000), (1024, 200_000)]
CPU_QUICK = [(256, 10_000), (512, 50_000)]
# (B, C, d): small problems (PML users' datasets: 100 .. 10k classes), where the fixed cost of a
# call (~120 small ops against plain PyTorch's ~70) shows instead of the sweep's advantage.
SMALL = [(64, 100, 64), (256, 1_000, 128), (128, 10_000, 256)]
# (B, C, d): the goal row (1024 x 1M at d = 512), the C = 100k, and d off 512 at C = 200k.
CUDA_SHAPES = [(256, 10_000, D), (1024, 100_000, D), (1024, 200_000, D), (1024, 1_000_000, D),
               (1024, 200_000, 128), (1024, 200_000, 256), (1024, 200_000, 1024)]


def naive(x, w, y):
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    logits = cos - MARGIN * F.one_hot(y, w.shape[0]).to(cos.dtype)
    return F.cross_entropy(SCALE * logits.float(), y)


def ours(x, w, y, backend="auto"):
    return cosine_margin_cross_entropy(x, w, y, scale=SCALE, margin_type="cosface", margin=MARGIN,
                                       backend=backend)


def liger(x, w, y):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(SCALE * F.normalize(x, dim=1), F.normalize(w, dim=1), y)


def cce(x, w, y):
    from cut_cross_entropy import linear_cross_entropy
    return linear_cross_entropy(SCALE * F.normalize(x, dim=1), F.normalize(w, dim=1), y)


PEER_MODULES = {"liger": "liger_kernel.transformers.functional", "cce": "cut_cross_entropy"}
PROVIDERS = {"bct_fast": ours, "torch": naive, "liger": liger, "cce": cce,
             "bct_fast_cuda": lambda x, w, y: ours(x, w, y, "cuda"),
             "bct_fast_epilogue": lambda x, w, y: ours(x, w, y, "epilogue"),
             "bct_fast_fused": lambda x, w, y: ours(x, w, y, "fused"),
             "bct_fast_torch": lambda x, w, y: ours(x, w, y, "torch"),
             "bct_fast_auto": lambda x, w, y: ours(x, w, y, "auto")}
CPU_PROVIDERS = ["bct_fast", "torch"]
CUDA_PROVIDERS = ["bct_fast_auto", "bct_fast_cuda", "bct_fast_epilogue", "bct_fast_fused", "bct_fast_torch",
                  "torch", "liger", "cce"]


@functools.lru_cache(maxsize=2)
def _base_case(B, C, d, device, dtype):
    # Drawn once per shape: a 1M x 512 classifier takes ~3 s to draw on a CPU, per benchmark row
    # that was ~90 s of a 15-minute GPU lease.
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, d, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(C, d, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


def make_case(B, C, device, dtype, frozen, d=D):
    x, w, y = _base_case(B, C, d, str(device), dtype)
    return x.clone().requires_grad_(True), w.clone().requires_grad_(not frozen), y


def step_fn(provider, mode, x, w, y):
    """One timed step; ``provider`` names one of PROVIDERS or is the loss function itself."""
    fn = PROVIDERS[provider] if isinstance(provider, str) else provider
    params = [t for t in (x, w) if t.requires_grad]

    def step():
        if mode == "forward":
            with torch.no_grad():
                return fn(x, w, y)
        return torch.autograd.grad(fn(x, w, y), params)

    return step


def _rounds(B: int, C: int, d: int) -> int:
    """Timed rounds: milliseconds-long steps (small problems) need more for a stable median."""
    return 3 if B * C * d >= 1 << 27 else 30


def _bench(measure, device, dtype, B, C, provider, mode, classifier, d=D):
    if provider == "bct_fast_fused" and dtype != torch.bfloat16:
        pytest.skip("the fused provider takes bfloat16 operands only")
    if provider in PEER_MODULES:
        pytest.importorskip(PEER_MODULES[provider])
    x, w, y = make_case(B, C, device, dtype, classifier == "frozen", d)
    grad_w_mib = 0.0 if classifier == "frozen" or mode == "forward" else C * d * 4 / 2**20
    measure(step_fn(provider, mode, x, w, y), device, rounds=_rounds(B, C, d), B=B, C=C, d=d, dtype=str(dtype),
            provider=provider, mode=mode, classifier=classifier,
            weight_grad_mib=round(grad_w_mib, 1))


@pytest.mark.parametrize("classifier", ["trainable", "frozen"])
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.grid("B,C", CPU_QUICK, CPU_FULL)
def test_margin_ce_cpu(measure, B, C, provider, mode, classifier):
    _bench(measure, "cpu", torch.float32, B, C, provider, mode, classifier)


@pytest.mark.cuda
@pytest.mark.parametrize("classifier", ["trainable", "frozen"])
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", CUDA_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,C,d", CUDA_SHAPES, ids=[f"B{b}-C{c}-d{d}" for b, c, d in CUDA_SHAPES])
def test_margin_ce_cuda(measure, B, C, d, dtype, provider, mode, classifier):
    if d != D and (dtype != torch.bfloat16 or provider == "bct_fast_cuda"):
        pytest.skip("d off 512: bf16 and the tensor-core providers only (keeps the file in time)")
    _bench(measure, "cuda", dtype, B, C, provider, mode, classifier, d)


# Classes per chunk of the epilogue sweeps (None: the default, ~16M scores: 16384 classes at
# B = 1024). H200, 2026-11-26: 56.6 ms at 4096 (the default then, sized for the L2), 29.2 ms at
# 16384, 27.5 ms at 65536 (gpu_2026-11-26b_h200.md); 4096 stays as the old default's row.
EPILOGUE_CHUNKS = [None, 4096, 65_536]


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", EPILOGUE_CHUNKS, ids=[f"chunk{c or 'default'}" for c in EPILOGUE_CHUNKS])
@pytest.mark.parametrize("provider", ["bct_fast_fused", "bct_fast_epilogue"])
def test_margin_ce_cuda_epilogue_chunks(measure, provider, chunk):
    """B = 1024, C = 1M, d = 512, bf16, trainable forward + backward."""
    x, w, y = make_case(1024, 1_000_000, "cuda", torch.bfloat16, False)
    backend = provider.rsplit("_", 1)[1]

    def fn(x_, w_, y_):
        return cosine_margin_cross_entropy(x_, w_, y_, scale=SCALE, margin_type="cosface", margin=MARGIN,
                                           backend=backend, chunk_size=chunk)

    measure(step_fn(fn, "full", x, w, y), "cuda", rounds=3, B=1024, C=1_000_000, d=D,
            dtype=str(torch.bfloat16), provider=f"{provider}_chunk{chunk or 'default'}", mode="full",
            classifier="trainable", chunk=chunk or 0)


@pytest.mark.parametrize("classifier", ["trainable", "frozen"])
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("B,C,d", SMALL, ids=[f"B{b}-C{c}-d{d}" for b, c, d in SMALL])
def test_margin_ce_cpu_small(measure, B, C, d, provider, mode, classifier):
    _bench(measure, "cpu", torch.float32, B, C, provider, mode, classifier, d)


# The loss modules against pytorch-metric-learning's (what PML users swap out): the same
# hyperparameters, each module holding its own [C, d] weight; fwd + bwd, CPU, small problems.
MODULES = {"cosface": ({"margin": 0.35, "scale": 64.0}, {"margin": 0.35, "scale": 64}),
           "arcface": ({"margin": 0.5, "scale": 64.0}, {"margin": 28.6, "scale": 64})}  # PML: degrees


@pytest.mark.parametrize("provider", ["bct_fast", "pml"])
@pytest.mark.parametrize("loss", list(MODULES))
@pytest.mark.parametrize("B,C,d", SMALL, ids=[f"B{b}-C{c}-d{d}" for b, c, d in SMALL])
def test_loss_modules_vs_pml(measure, B, C, d, loss, provider):
    ours_kw, pml_kw = MODULES[loss]
    if provider == "pml":
        pml = pytest.importorskip("pytorch_metric_learning.losses")
        module = {"cosface": pml.CosFaceLoss, "arcface": pml.ArcFaceLoss}[loss](C, d, **pml_kw)
    else:
        from bct_fast import losses
        module = {"cosface": losses.CosFaceLoss, "arcface": losses.ArcFaceLoss}[loss](C, d, **ours_kw)
    x, _, y = make_case(B, C, "cpu", torch.float32, False, d)
    params = [x, *module.parameters()]
    measure(lambda: torch.autograd.grad(module(x, y), params), "cpu", rounds=_rounds(B, C, d),
            B=B, C=C, d=d, loss=loss, provider=provider, mode="full")
