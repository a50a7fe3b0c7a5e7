"""CUDAARCHS=native is resolved to explicit architectures (or refused), never recorded literally."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "cmake" / "CudaArchitectures.cmake"


def resolve(archs: str, tmp_path: Path, smi_output: str | None):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake on PATH")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if smi_output is not None:  # a fake nvidia-smi: the GPU machine's answer, without a GPU
        smi = bindir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nprintf '{smi_output}'\n")
        smi.chmod(0o755)
    probe = tmp_path / "probe.cmake"
    probe.write_text(f'include("{MODULE}")\nset(A "{archs}")\nbct_fast_resolve_native_archs(A)\n'
                     'message(STATUS "ARCHS=${A}")\n')
    env = dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin")
    return subprocess.run([cmake, "-P", str(probe)], capture_output=True, text=True, env=env, timeout=60)


def test_native_resolves_to_the_visible_gpus(tmp_path):
    out = resolve("native", tmp_path, "9.0\\n9.0\\n")
    assert out.returncode == 0, out.stderr
    assert "ARCHS=90-real" in out.stdout and "native" not in out.stdout.split("ARCHS=")[1]


def test_native_without_a_gpu_is_a_clear_error(tmp_path):
    out = resolve("native", tmp_path, None)
    assert out.returncode != 0
    assert "no GPU is visible" in out.stderr and "CUDAARCHS" in out.stderr


def test_explicit_lists_are_kept(tmp_path):
    out = resolve("80-real;90a-real", tmp_path, None)
    assert out.returncode == 0 and "ARCHS=80-real;90a-real" in out.stdout
