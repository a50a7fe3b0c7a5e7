"""CUTLASS/CuTe's fragment layouts of mma.m16n8k16 (bf16) and ldmatrix .x4 (plain and .trans),
evaluated from CuTe's own headers (``cute_fragment_tables.cu``, compiled with nvcc as host code
against the nvidia-cutlass wheel's headers) and cached like the emulator build.

They are an independent reading of the PTX ISA: CUTLASS's kernels run these layouts on
hardware, so agreement with our emulations (mma_common.cuh) means the layouts the fused kernels
were checked against are not only ours.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cute_fragment_tables.cu")


def cutlass_include_dir() -> Path | None:
    """The CUTLASS/CuTe headers shipped in the nvidia-cutlass wheel (package cutlass_library),
    found without importing the package; None when it is not installed."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "source" / "include"
        if (inc / "cute" / "atom" / "mma_traits_sm80.hpp").is_file():
            return inc
    return None


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def tables() -> dict:
    """The layouts as a dict of numpy arrays (thread x value); builds once per source/headers."""
    inc, compiler = cutlass_include_dir(), nvcc()
    if inc is None or compiler is None:
        raise RuntimeError("needs nvcc and the nvidia-cutlass wheel (pip install nvidia-cutlass)")
    h = hashlib.sha256(SOURCE.read_bytes())
    for header in ("cute/atom/mma_traits_sm80.hpp", "cute/atom/copy_traits_sm75.hpp"):
        h.update((inc / header).read_bytes())
    h.update(subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.encode())
    root = Path(os.environ.get("BCT_FAST_EMU_CACHE", Path(tempfile.gettempdir()) / "bct_fast_emu"))
    out_dir = root / f"cute-tables-{h.hexdigest()[:16]}"
    out = out_dir / "tables.json"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / ".lock", "w") as lock:  # one builder at a time (pytest-xdist)
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.exists():
                exe = out_dir / "cute_fragment_tables"
                cmd = [compiler, "-std=c++17", f"-I{inc}", str(SOURCE), "-o", str(exe)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"building {SOURCE.name} failed: {' '.join(cmd)}\n{r.stderr}")
                r = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
                tmp = out_dir / "tables.json.tmp"
                tmp.write_text(r.stdout)
                os.replace(tmp, out)
    raw = json.loads(out.read_text())
    return {k: np.asarray(v) if isinstance(v, list) else v for k, v in raw.items()}
