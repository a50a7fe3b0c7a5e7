"""The Python -> ``bct_fast._C`` -> launcher glue of every CUDA provider, run on the CPU.

``csrc/bindings.cpp`` itself is built against the emulated launchers
(:func:`kernel_emulator.build_bindings`), and the package's own launch functions
(``margin_softmax_cuda.native_*_launch``, the epilogue and fused providers' ``_cuda_*`` /
``native_launch``, ``topk_cuda.launch_partial``) call it with CPU tensors' addresses in a child
process (``emulated_bindings_child.py``). Each result is checked against float64 here.

What this adds to the other emulated tests, which call the launchers from a C++ driver: the
binding layer. The first GPU run lost 25 tests to glue; an argument order that differs between
a Python call, its pybind11 lambda and the launcher (two same-typed pointers swapped) compiles,
passes the static arity check (tests/build/test_binding_calls.py) and shows only when it runs.
The negative controls swap two same-typed arguments of a binding and must fail the same checks.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_emulator as emu
from topk_reference import assert_topk_matches_reference

pytestmark = pytest.mark.emulated

CHILD = Path(__file__).with_name("emulated_bindings_child.py")


@pytest.fixture(scope="module")
def module_path() -> Path:
    emu.require_built()  # skips where the emulator cannot run (not Linux, no g++)
    pytest.importorskip("pybind11")  # its headers build the module (a test extra)
    return emu.build_bindings()


class ChildFailed(AssertionError):
    """The child process did not finish its case (a launcher error, a fault, an exception)."""

    def __init__(self, case: str, returncode: int, stderr: str):
        self.stderr = stderr
        super().__init__(f"{case}: child exited {returncode}:\n{stderr[-4000:]}")


def run_case(module_path: Path, tmp_path: Path, case: str, *options: str) -> tuple[dict, dict]:
    out = tmp_path / f"{case}.pt"
    r = subprocess.run([sys.executable, str(CHILD), str(module_path), case, str(out), *options],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise ChildFailed(case, r.returncode, r.stderr)
    saved = torch.load(out)
    return saved["inputs"], saved["outputs"]


# ---- float64 references of the sweep contract (margin_softmax_torch's docstring) ----------------

def _logits(t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z with each row's target column at -inf, x_hat, w_hat), float64, from the inputs' values."""
    xh = t["x"].double() * t["inv_nx"].double()[:, None]
    wh = t["w"].double() * t["inv_nw"].double()[:, None]
    z = t["scale"] * xh @ wh.T
    rows = (t["labels"] >= 0).nonzero()[:, 0]
    z[rows, t["labels"][rows]] = float("-inf")
    return z, xh, wh


def check_stats(t: dict, out: dict, pws_rtol: float) -> None:
    z, _, wh = _logits(t)
    lse = torch.logsumexp(z, dim=1)
    torch.testing.assert_close(out["lse"].double(), lse, rtol=1e-5, atol=1e-5)
    if out["pws"].numel():
        pws = torch.softmax(z, dim=1) @ wh
        torch.testing.assert_close(out["pws"].double(), pws, rtol=0, atol=pws_rtol * pws.abs().max().item())


def check_grads(t: dict, out: dict, rtol: float) -> None:
    z, xh, wh = _logits(t)
    p = torch.exp(z - t["lse"].double()[:, None]) * t["row_coef"].double()[:, None]
    for name, ref in (("gx", p @ wh), ("gw", p.T @ xh)):
        torch.testing.assert_close(out[name].double(), ref, rtol=0, atol=rtol * ref.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_topk(t: dict, out: dict, exclude: bool, row0: int = 0) -> None:
    index = out["index"] - row0
    assert_topk_matches_reference(out["scores"], index, t["q"], t["g"], 10, atol=1e-5, exclude_self=exclude)


# bf16 inputs: the epilogue / fused providers' e, p, pw blocks are bf16 (2^-9 relative each);
# everything else is fp32 arithmetic on exactly upcast values.
STATS = {"margin_cuda_stats_f32": 1e-5, "margin_cuda_stats_pws_bf16": 1e-5,
         "margin_epilogue_stats_pws_f32": 1e-5, "margin_epilogue_stats_bf16": 1e-5,
         "margin_fused_stats_bf16": 1e-5, "margin_fused_stats_pws_bf16": 1e-2}
GRADS = {"margin_cuda_grads_f32": 1e-5, "margin_epilogue_grads_f32": 1e-5,
         "margin_epilogue_grads_bf16": 1e-2}
TOPK = {"topk_cuda_f32_offsets": (False, 1000), "topk_cuda_bf16_exclude": (True, 0),
        "topk_epilogue_f32_exclude": (True, 0), "topk_epilogue_bf16": (False, 0),
        "topk_fused_bf16_exclude": (True, 0), "topk_fused_bf16": (False, 0)}


@pytest.mark.parametrize("case", list(STATS))
def test_margin_stats_through_the_bindings(module_path, tmp_path, case):
    t, out = run_case(module_path, tmp_path, case)
    check_stats(t, out, STATS[case])


@pytest.mark.parametrize("case", list(GRADS))
def test_margin_grads_through_the_bindings(module_path, tmp_path, case):
    t, out = run_case(module_path, tmp_path, case)
    check_grads(t, out, GRADS[case])


@pytest.mark.parametrize("case", list(TOPK))
def test_topk_through_the_bindings(module_path, tmp_path, case):
    t, out = run_case(module_path, tmp_path, case)
    check_topk(t, out, *TOPK[case])


def test_tile_checks_through_the_bindings(module_path, tmp_path):
    t, out = run_case(module_path, tmp_path, "tile_checks_bf16")
    a, b, c = t["a"].double(), t["b"].double(), t["c"].double()
    torch.testing.assert_close(out["margin_fused_mma_tile_check"].double(), c + a @ b.T, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["margin_fused_pv_tile_check"].double(), c + a @ b, rtol=1e-6, atol=1e-5)


# ---- negative controls: a same-typed swap at the binding boundary must fail these checks ---------

@pytest.mark.parametrize("case,swap,check", [
    # m_io <-> l_io: two fp32 [B] in-out pointers
    ("margin_epilogue_stats_pws_f32", "margin_epilogue_stats:8:9", lambda t, o: check_stats(t, o, 1e-5)),
    # inv_nx <-> inv_nw of the SIMT sweep: both fp32 pointers
    ("margin_cuda_grads_f32", "margin_softmax_grad_weight:2:3", lambda t, o: check_grads(t, o, 1e-5)),
])
def test_a_swapped_argument_is_caught(module_path, tmp_path, case, swap, check):
    t, out = run_case(module_path, tmp_path, case, f"swap={swap}")
    with pytest.raises(AssertionError):
        check(t, out)


def test_a_swapped_integer_is_refused_by_the_launcher(module_path, tmp_path):
    """n0 <-> self_col0 (two int64 scalars of the top-k selection): the second gallery chunk's
    self column is negative, and the launcher's own argument check names it."""
    with pytest.raises(ChildFailed, match="topk_epilogue_select: n0 must be >= 0"):
        run_case(module_path, tmp_path, "topk_epilogue_f32_exclude", "swap=topk_epilogue_select:6:8")


def test_fused_launchers_need_what_device_limits_says(module_path, tmp_path):
    """bct_fast.ops.device_limits' byte counts are the launchers' own: each fused launch runs with
    exactly that much shared memory allowed and is refused, naming the reason, with one byte
    less. So `auto` on a smaller GPU (an A100, an sm_89 part) picks another provider instead of
    raising from the launcher."""
    _, out = run_case(module_path, tmp_path, "smem_limits")
    assert len(out) == 8
    for name, (ran_at_need, refused_below) in out.items():
        assert ran_at_need and refused_below, name
