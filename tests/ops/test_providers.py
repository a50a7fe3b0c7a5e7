"""The one place that picks a provider per op (bct_fast.ops.providers), the kernel-verification
record, and the CUDA providers' host-side logic with the kernel launch replaced by a stub."""
import json
import math
import warnings

import pytest
import torch

from bct_fast._core import extension
from bct_fast.ops import cosine_topk, margin_softmax_cuda, providers, topk_cuda
from topk_reference import assert_topk_matches_reference

CUDA = torch.device("cuda")  # only its type is read: no GPU needed


_REAL_NO_CODE_FOR = providers._no_code_for


@pytest.fixture
def compiled(monkeypatch):
    """Pretend the CUDA kernels are compiled (and unverified) on this machine, for a stand-in
    device whatever GPU (if any) this machine has."""
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setattr(providers, "_no_code_for", lambda device: None)
    monkeypatch.setattr(providers, "_verified", lambda family: False)
    monkeypatch.delenv(providers.UNVERIFIED_ENV, raising=False)


def test_cpu_tensors_take_the_torch_provider():
    assert providers.choose("cosine_topk", torch.device("cpu"), "auto", lambda: None).provider == "torch"
    with pytest.raises(ValueError, match="backend: 'cuda' needs CUDA tensors"):
        providers.choose("cosine_topk", torch.device("cpu"), "cuda", lambda: None)
    with pytest.raises(ValueError, match="backend: expected one of"):
        providers.choose("cosine_topk", torch.device("cpu"), "fast", lambda: None)
    with pytest.raises(ValueError, match="backend"):
        cosine_topk(torch.randn(2, 3), torch.randn(4, 3), 1, backend="cuda")


def test_a_cpu_only_build_says_so(monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: False)
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: None)
    assert c.provider == "torch" and c.warn and "built without CUDA kernels" in c.reason
    with pytest.raises(ValueError, match="built without CUDA kernels"):
        providers.choose("margin_softmax", CUDA, "cuda", lambda: None)


def test_k_above_the_kernel_limit_is_named_not_blamed_on_the_build(compiled, monkeypatch):
    """Regression: a k above the kernel's limit used to warn 'built without CUDA kernels'."""
    monkeypatch.setattr(topk_cuda, "max_k", lambda: 4096)
    why = lambda: topk_cuda.unsupported(torch.float32, torch.float32, 5000)  # noqa: E731
    c = providers.choose("cosine_topk", CUDA, "auto", why)
    assert c.provider == "torch" and "k=5000 is above the kernel's limit of 4096" in c.reason
    assert "built without" not in c.reason
    with pytest.warns(RuntimeWarning, match="above the kernel's limit"):
        providers.note_fallback("cosine_topk_test_k", c)


def test_unverified_kernels_run_only_on_request(compiled, monkeypatch):
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: None)
    assert c.provider == "torch" and "not passed a recorded GPU run" in c.reason and c.warn
    assert providers.choose("margin_softmax", CUDA, "cuda", lambda: None).provider == "cuda"
    assert providers.choose("margin_softmax", CUDA, "torch", lambda: None).provider == "torch"
    monkeypatch.setenv(providers.UNVERIFIED_ENV, "1")
    assert providers.choose("margin_softmax", CUDA, "auto", lambda: None).provider == "cuda"


def test_verified_simt_kernels_are_the_default_where_not_measured_slower(compiled, monkeypatch):
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    monkeypatch.setattr(providers, "SIMT_SLOWER_THAN_TORCH", {})
    c = providers.choose("cosine_topk", CUDA, "auto", lambda: None)
    assert c.provider == "cuda" and not c.warn


@pytest.mark.parametrize("family", ["margin_softmax", "cosine_topk"])
def test_verified_simt_kernels_stay_on_request(compiled, monkeypatch, family):
    """Both measured slower than the chunked torch path on the H200: `auto` keeps the torch path
    and says why (no warning: nothing unexpected); backend='cuda' still runs them."""
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    c = providers.choose(family, CUDA, "auto", lambda: None)
    assert c.provider == "torch" and "slower" in c.reason and not c.warn
    assert providers.choose(family, CUDA, "cuda", lambda: None).provider == "cuda"


SERVES = lambda: None  # noqa: E731
REFUSES = lambda: providers.Unsupported("test: cannot serve")  # noqa: E731


@pytest.mark.parametrize("family,rows,epilogue,fused,expected", [
    ("margin_softmax", 1024, SERVES, SERVES, "fused"),
    ("margin_softmax", 1, SERVES, SERVES, "fused"),
    ("margin_softmax", 1024, SERVES, REFUSES, "epilogue"),   # fp32: the fused provider is bf16 only
    ("cosine_topk", 1000, SERVES, SERVES, "epilogue"),
    ("cosine_topk", None, SERVES, SERVES, "epilogue"),
    ("cosine_topk", 129, SERVES, SERVES, "epilogue"),
    ("cosine_topk", 128, SERVES, SERVES, "fused"),           # one fused query tile
    ("cosine_topk", 1, SERVES, SERVES, "fused"),
    ("cosine_topk", 1, SERVES, REFUSES, "epilogue"),         # k > 128, fp32
    ("cosine_topk", 1000, REFUSES, SERVES, "fused"),
    ("cosine_topk", 1000, REFUSES, REFUSES, "torch"),        # k > 4096: the SIMT kernel is slower
])
def test_auto_order_of_the_verified_tensor_core_providers(compiled, monkeypatch, family, rows,
                                                          epilogue, fused, expected):
    """The orders measured on the H200 (providers.AUTO_ORDER, SMALL_BATCH_ORDER)."""
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    c = providers.choose(family, CUDA, "auto", SERVES, epilogue, fused, rows=rows)
    assert c.provider == expected and not c.warn


def test_an_unverified_tensor_core_family_is_skipped(compiled, monkeypatch):
    monkeypatch.setattr(providers, "_verified", lambda family: family != "topk_fused")
    c = providers.choose("cosine_topk", CUDA, "auto", SERVES, SERVES, SERVES, rows=1)
    assert c.provider == "epilogue"


def test_float64_stays_on_torch_without_a_warning(compiled):
    x = torch.empty(0, dtype=torch.float64)
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: margin_softmax_cuda.unsupported(x, x))
    assert c.provider == "torch" and not c.warn
    assert topk_cuda.unsupported(torch.float32, torch.float64, 1).expected


def test_verification_record_matches_by_source_hash(tmp_path, monkeypatch):
    record = tmp_path / "gpu_verified.json"
    record.write_text(json.dumps({"cosine_topk": [{"sha256": "abc", "result": "gpu_x.json"}]}))
    monkeypatch.setattr(extension, "_VERIFIED_RECORD", record)
    monkeypatch.setattr(extension, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setattr(extension, "built_source_hashes", lambda: {"cosine_topk": "abc", "margin_softmax": "def"})
    v = extension.kernel_verification()
    assert v["cosine_topk"]["verified_on_gpu"] and v["cosine_topk"]["record"] == "gpu_x.json"
    assert not v["margin_softmax"]["verified_on_gpu"] and "never passed" in v["margin_softmax"]["reason"]


def test_source_hash_changes_with_any_kernel_file(tmp_path):
    for rel in ("csrc/bindings.cpp", "csrc/include/bct_fast/common.h", "csrc/cuda/cosine_topk.cu",
                "csrc/cuda/margin_softmax.cu", "csrc/cuda/tile_common.cuh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    before = extension.source_hashes(tmp_path)
    (tmp_path / "csrc/cuda/cosine_topk.cu").write_text("changed")
    after = extension.source_hashes(tmp_path)
    assert after["cosine_topk"] != before["cosine_topk"] and after["margin_softmax"] == before["margin_softmax"]


# ---- host-side logic of the CUDA providers, with the kernel replaced by a stub ---------------

def test_unfilled_kernel_slots_keep_index_minus_one():
    """Regression: the gallery offset was added to -1 slots, making row `gallery_row0 - 1`."""
    inf = float("inf")
    out_s = torch.tensor([[[0.9, 0.5, -inf]], [[0.7, -inf, -inf]]])   # [S=2, Q=1, k=3]
    out_i = torch.tensor([[[4, 1, -1]], [[0, -1, -1]]])              # split 2 had one usable row
    s, i = topk_cuda.merge_splits(out_s, out_i, 3, gallery_row0=1000)
    assert i.tolist() == [[1004, 1000, 1001]] and torch.equal(s, torch.tensor([[0.9, 0.7, 0.5]]))
    s, i = topk_cuda.merge_splits(out_s[1:], out_i[1:], 3, gallery_row0=1000)
    assert i.tolist() == [[1000, -1, -1]]


def fake_launch(q, g, k, normalize, exclude_offset):
    """The kernel's contract computed in torch: 2 gallery splits, each a best-first list of k
    with (-inf, -1) in places a split cannot fill; ties to the lower index."""
    qn = torch.nn.functional.normalize(q.float(), dim=1) if normalize else q.float()
    gn = torch.nn.functional.normalize(g.float(), dim=1) if normalize else g.float()
    s = qn @ gn.T
    if exclude_offset is not None:
        rows = torch.arange(q.shape[0]) + exclude_offset
        ok = (rows >= 0) & (rows < g.shape[0])
        s[ok.nonzero()[:, 0], rows[ok]] = -float("inf")
    half = (g.shape[0] + 1) // 2
    out_s = torch.full((2, q.shape[0], k), -float("inf"))
    out_i = torch.full((2, q.shape[0], k), -1, dtype=torch.int64)
    for sp, (a, b) in enumerate(((0, half), (half, g.shape[0]))):
        part = s[:, a:b]
        for r in range(q.shape[0]):
            real = [(float(v), j + a) for j, v in enumerate(part[r].tolist()) if v != -float("inf")]
            real.sort(key=lambda t: (-t[0], t[1]))
            for p, (v, j) in enumerate(real[:k]):
                out_s[sp, r, p], out_i[sp, r, p] = v, j
    return out_s, out_i, False


def test_kernel_route_end_to_end_with_a_stub(seed, monkeypatch):
    """cosine_topk's kernel route (chunks, splits, exclude_self with k = chunk rows) with the
    launch stubbed: exact against the float64 reference, no -1 or offset -1 leaks."""
    monkeypatch.setattr(topk_cuda, "launch_partial", fake_launch)
    monkeypatch.setattr("bct_fast.ops.topk.choose", lambda *a, **kw: providers.Choice("cuda", "test"))
    g = torch.randn(40, 12)
    s, i = cosine_topk(g, g, 10, exclude_self=True, chunk_size=10)
    assert (i >= 0).all()
    assert_topk_matches_reference(s, i, g, g, 10, exclude_self=True)


def test_lse_merge_of_empty_and_all_minus_inf_splits():
    """Regression: exp(-inf - -inf) = NaN when a split (or a whole row) has no finite logit."""
    inf = float("inf")
    m = torch.tensor([[1.0, -inf], [-inf, -inf], [2.0, -inf]])   # [S=3, B=2]
    l = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    lse, w, l_all = margin_softmax_cuda.merge_class_splits(m, l)
    ref = torch.logsumexp(torch.tensor([1.0, 2.0 + math.log(2.0)], dtype=torch.float64), 0)
    assert lse.dtype == torch.float64 and torch.allclose(lse[0], ref) and lse[1] == -inf
    assert not torch.isnan(w).any() and not torch.isnan(lse).any()


def test_fallback_warning_names_the_reason(compiled):
    c = providers.choose("margin_softmax", CUDA, "auto", lambda: None)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        providers.note_fallback("unique_op_name_for_this_test", c)
    assert any("not passed a recorded GPU run" in str(r.message) for r in rec)


@pytest.mark.parametrize("archs,capability,runs", [
    ("80-real,90-real,90-virtual", (8, 0), True),
    ("80-real,90-real,90-virtual", (8, 6), True),     # same major: the sm_80 cubin runs
    ("80-real,90-real,90-virtual", (8, 9), True),
    ("80-real,90-real,90-virtual", (12, 0), True),    # newer: the compute_90 PTX is compiled at load
    ("80-real,90-real,90-virtual", (7, 5), False),    # a T4: nothing older than sm_80
    ("90a-real", (9, 0), True),
    ("90a-real", (10, 0), False),                     # arch-specific code runs on its own GPU only
    ("90a-real", (8, 0), False),
    ("86-real", (8, 0), False),
    ("80", (9, 0), True),                             # "80": cubin and PTX
    ("80-real", (9, 0), False),
    ("100f-real", (10, 3), True),                     # family-specific cubin: its major
    ("100f-virtual", (12, 0), False),                 # family-specific PTX: its major only
    ("100f-virtual", (10, 3), True),
    ("all", (9, 0), None),                            # a list this cannot read: no verdict
    (None, (9, 0), None),
])
def test_build_runs_on(monkeypatch, archs, capability, runs):
    monkeypatch.setattr(extension, "built_architectures", lambda: archs)
    assert extension.build_runs_on(capability) is runs


def test_a_build_without_code_for_the_gpu_falls_back_and_says_why(compiled, monkeypatch):
    """A T4 (sm_75) with the default build (sm_80 / sm_90): every verified provider would fail to
    launch; `auto` takes the torch path with a warning naming the rebuild, the explicit backends
    raise."""
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    monkeypatch.setattr(providers, "_no_code_for", _REAL_NO_CODE_FOR)
    monkeypatch.setattr(providers, "built_architectures", lambda: "80-real,90-real,90-virtual")
    monkeypatch.setattr(extension, "built_architectures", lambda: "80-real,90-real,90-virtual")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    providers._no_code_for_index.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        c = providers.choose("cosine_topk", dev, "auto", lambda: None, lambda: None, lambda: None, rows=1)
        assert c.provider == "torch" and c.warn and "sm_75" in c.reason and "CUDAARCHS=75-real" in c.reason
        for backend in ("cuda", "epilogue", "fused"):
            with pytest.raises(ValueError, match="sm_75"):
                providers.choose("cosine_topk", dev, backend, lambda: None, lambda: None, lambda: None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))
        providers._no_code_for_index.cache_clear()
        c = providers.choose("cosine_topk", dev, "auto", lambda: None, lambda: None, lambda: None, rows=1)
        assert c.provider == "fused"
    finally:
        providers._no_code_for_index.cache_clear()


def test_simt_limits_do_not_hold_back_the_tensor_core_providers(compiled, monkeypatch):
    """A call the SIMT kernel cannot serve (its own k, dtype or shared-memory limits) still goes
    to a verified epilogue / fused provider that can."""
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    simt_refuses = lambda: providers.Unsupported("SIMT: test limit")  # noqa: E731
    c = providers.choose("margin_softmax", CUDA, "auto", simt_refuses, lambda: None, lambda: None)
    assert c.provider == "fused"
    c = providers.choose("cosine_topk", CUDA, "auto", simt_refuses, lambda: None, lambda: None, rows=1000)
    assert c.provider == "epilogue"
    c = providers.choose("cosine_topk", CUDA, "auto", simt_refuses, REFUSES, REFUSES, rows=1000)
    assert c.provider == "torch" and "SIMT: test limit" in c.reason
