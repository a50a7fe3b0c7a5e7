"""The package imports everywhere and reports what it was built with."""
import os
import shutil
import subprocess
import sys
import tempfile

import bct_fast


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter outside the source tree (so the installed package loads)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())


def test_build_info_keys():
    info = bct_fast.build_info()
    for key in ("version", "extension_loaded", "cuda_compiled", "cuda_architectures",
                "driver_version", "device_count", "torch_version", "cpu_gemm"):
        assert key in info
    assert info["version"] == bct_fast.__version__
    assert info["extension_loaded"], info.get("extension_error")
    assert isinstance(info["device_count"], int) and info["device_count"] >= 0


def test_cuda_compiled_when_nvcc_present():
    """Where nvcc exists (this project's CI) the default AUTO build must compile the kernels."""
    if os.environ.get("BCT_FAST_CUDA", "AUTO").upper() == "OFF":
        return
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    info = bct_fast.build_info()
    assert info["cuda_compiled"] == bool(nvcc), info
    if nvcc:
        assert "90" in info["cuda_architectures"] and "native" not in info["cuda_architectures"]


def test_extension_imports_without_torch():
    """The compiled module never links libtorch: it must load with torch unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import bct_fast, bct_fast._C as c\n"
            "info = bct_fast.build_info()\n"
            "assert info['torch_version'] is None and info['extension_loaded'], info\n"
            "print(c.build_info()['cuda_compiled'])")
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")


def test_lazy_import_is_cheap():
    code = ("import sys, bct_fast\n"
            "assert 'bct_fast.ops' not in sys.modules and 'bct_fast._C' not in sys.modules\n"
            "bct_fast.losses\n"
            "assert 'bct_fast.ops' in sys.modules")
    out = run_python(code)
    assert out.returncode == 0, out.stderr


def test_build_matches_the_source_tree():
    """What runs is what was built: the extension's embedded per-kernel source hashes equal the
    hashes of this checkout's csrc/ (a stale or foreign build fails here, naming the family)."""
    from pathlib import Path

    from bct_fast._core.extension import built_source_hashes, source_hashes

    root = Path(__file__).resolve().parents[2]
    if not bct_fast.build_info()["cuda_compiled"]:
        assert built_source_hashes() == {}
        return
    assert built_source_hashes() == source_hashes(root), "rebuild: csrc/ changed since this build"


def test_unverified_kernels_are_not_the_default(monkeypatch):
    """Without a recorded GPU run of these exact sources, build_info says the kernels are not
    verified, and the auto route for CUDA tensors is the torch provider."""
    import torch

    from bct_fast._core.extension import verified_record
    from bct_fast.ops import providers

    monkeypatch.delenv(providers.UNVERIFIED_ENV, raising=False)
    info = bct_fast.build_info()
    for family, k in info["kernels"].items():
        recorded = {r["sha256"] for r in verified_record().get(family, [])}
        assert k["verified_on_gpu"] == (info["kernel_sources"].get(family) in recorded), family
        if not k["verified_on_gpu"] and info["cuda_compiled"]:
            choice = providers.choose(family, torch.device("cuda"), "auto", lambda: None)
            assert choice.provider == "torch" and "recorded GPU run" in choice.reason


def test_build_info_names_the_emulation_test_of_each_kernel_family():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for family, k in bct_fast.build_info()["kernels"].items():
        assert (root / k["emulated_by"]).is_file(), family
