"""bct_fast.ops.device_limits: the fused providers step aside on GPUs whose per-block shared
memory is smaller than their kernels need (the byte counts themselves are checked against the
launchers in tests/ops/test_bindings_emulated.py). No GPU needed: the device is a stand-in."""
import types

import pytest
import torch

from bct_fast.ops import device_limits, margin_softmax_fused, providers, topk_fused

GPU = torch.device("cuda", 0)
H100, A100, SM89 = 232448, 166912, 101376


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device 0 of compute capability 8.x whose opt-in limit the test sets."""
    limit = {"bytes": H100}
    monkeypatch.setattr(device_limits, "_optin_of", lambda index: limit["bytes"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    # the stand-in's architecture is not this machine's (a GPU run of this file must not cache a
    # verdict about its real device 0 from the fake capability)
    monkeypatch.setattr(providers, "_no_code_for", lambda device: None)
    return limit


def rows(dtype=torch.bfloat16):
    return types.SimpleNamespace(device=GPU, dtype=dtype)


@pytest.mark.parametrize("limit,fits", [(H100, {10: True, 50: True, 100: True}),
                                        (A100, {10: True, 50: True, 100: False}),
                                        (SM89, {10: False, 50: False, 100: False})])
def test_fused_search_serves_the_k_its_lists_fit(gpu, limit, fits):
    gpu["bytes"] = limit
    for k, ok in fits.items():
        why = topk_fused.unsupported(rows(), torch.bfloat16, k)
        assert (why is None) == ok, (limit, k, why)
        if not ok:
            assert why.expected and "shared memory" in why.reason and str(limit) in why.reason


def test_auto_takes_the_epilogue_search_where_the_fused_lists_do_not_fit(gpu, monkeypatch):
    monkeypatch.setattr(providers, "cuda_kernels_compiled", lambda: True)
    monkeypatch.setattr(providers, "_verified", lambda family: True)
    gpu["bytes"] = A100
    pick = lambda k: providers.choose("cosine_topk", GPU, "auto", lambda: None, lambda: None,  # noqa: E731
                                      lambda: topk_fused.unsupported(rows(), torch.bfloat16, k), rows=1)
    assert pick(64).provider == "fused" and pick(100).provider == "epilogue"


def test_fused_loss_kernels_on_smaller_gpus(gpu):
    gpu["bytes"] = SM89
    assert margin_softmax_fused.unsupported(rows(), rows()) is None  # the lse kernel: 80 KiB
    fits = {d: device_limits.smem_shortfall(GPU, device_limits.margin_fused_pws_smem(d), "") is None
            for d in (64, 128, 256, 512)}
    assert fits == {64: True, 128: True, 256: False, 512: False}
    gpu["bytes"] = A100
    assert device_limits.smem_shortfall(GPU, device_limits.margin_fused_pws_smem(512), "") is not None
    gpu["bytes"] = 64 * 1024
    why = margin_softmax_fused.unsupported(rows(), rows())
    assert why is not None and "81920" in why.reason


def test_pws_smem_by_padded_depth():
    assert [device_limits.margin_fused_pws_smem(d) for d in (1, 64, 65, 128, 200, 256, 257, 512)] == \
        [39680, 39680, 64256, 64256, 113408, 113408, 211712, 211712]
    assert [device_limits.topk_fused_kmax(k) for k in (1, 32, 33, 64, 65, 128)] == [32, 32, 64, 64, 128, 128]


def test_opt_in_limit_from_the_device_or_its_capability(monkeypatch):
    device_limits._optin_of.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: types.SimpleNamespace(shared_memory_per_block_optin=A100))
        assert device_limits.optin_smem(GPU) == A100
        device_limits._optin_of.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace())
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))
        assert device_limits.optin_smem(GPU) == SM89
        device_limits._optin_of.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
        assert device_limits.optin_smem(GPU) == H100
    finally:
        device_limits._optin_of.cache_clear()
    assert device_limits.optin_smem(torch.device("cpu")) is None


def test_the_frozen_forward_hands_pws_to_the_epilogue_sweep_where_its_tiles_do_not_fit(gpu, monkeypatch):
    monkeypatch.setattr(margin_softmax_fused, "native",
                        lambda: types.SimpleNamespace(margin_fused_pws_max_d=512))
    x = rows()
    gpu["bytes"] = SM89
    assert [margin_softmax_fused._pws_fused(x, d) for d in (64, 128, 129, 512, 513)] == \
        [True, True, False, False, False]
    gpu["bytes"] = H100
    assert [margin_softmax_fused._pws_fused(x, d) for d in (64, 512, 513)] == [True, True, False]
