"""Builds and runs the CPU emulator of the CUDA kernels (csrc/emulator/, see cuda_shim.h).

The launchers of csrc/cuda/*.cu are compiled with g++ against the shim: each
``kernel<<<grid, block, smem, stream>>>(args)`` is rewritten into a ``bct_emu::launcher`` call,
everything else (launch geometry, dispatch, kernels) is the code that nvcc compiles. The build is
cached under the temp dir, keyed by the hash of its sources and flags; each run is a subprocess,
so a fault (guard page) or an emulator error fails one test instead of killing pytest.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = ROOT / "csrc" / "emulator"
INCLUDE_DIR = ROOT / "csrc" / "include"

CXX = os.environ.get("CXX", "g++")
FLAGS = ["-O1", "-g", "-std=c++17", "-DBCT_FAST_EMULATOR"]
# Kernel objects only: -fsanitize=thread makes g++ call __tsan_readN/__tsan_writeN around every
# memory access; cuda_shim.cpp implements them as the shared-memory race check (no TSan runtime).
# -fno-ipa-reference: a kernel's `static` (= __shared__) arrays must be re-read after each
# barrier call, as on the GPU; -fno-tree-loop-distribute-patterns: no uninstrumented memset.
KERNEL_FLAGS = ["-fsanitize=thread", "-fno-ipa-reference", "-fno-tree-loop-distribute-patterns"]
KERNEL_SOURCES = ["margin_softmax", "margin_epilogue", "cosine_topk", "topk_epilogue",
                  "margin_fused", "topk_fused"]
KERNEL_OBJECTS = [f"{n}_emu" for n in KERNEL_SOURCES] + ["selftest_emu", "fragment_probe_emu"]

# Fault injection for the harness's self-test (hooks in csrc/cuda/tile_common.cuh).
BREAKS = {
    None: [],
    "missing_barrier": ["-DBCT_FAST_EMU_BREAK_MISSING_BARRIER"],
    "tail_off_by_one": ["-DBCT_FAST_EMU_BREAK_TAIL_OFF_BY_ONE"],
    "tie_order": ["-DBCT_FAST_EMU_BREAK_TIE_ORDER"],  # topk_epilogue_kernels.cuh, topk_fused_kernels.cuh
    "mma_layout": ["-DBCT_FAST_EMU_BREAK_MMA_LAYOUT"],  # csrc/cuda/mma_common.cuh
    "topk_pending": ["-DBCT_FAST_EMU_BREAK_TOPK_PENDING"],  # csrc/cuda/topk_fused_kernels.cuh
    "pack_halves": ["-DBCT_FAST_EMU_BREAK_PACK_HALVES"],  # csrc/cuda/mma_common.cuh
    "pws_b2": ["-DBCT_FAST_EMU_BREAK_PWS_B2"],  # csrc/cuda/margin_fused_pws_kernels.cuh
    "pws_b3": ["-DBCT_FAST_EMU_BREAK_PWS_B3"],  # csrc/cuda/margin_fused_pws_kernels.cuh
}

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
EXIT_EMULATOR_ERROR = 3
EXIT_LAUNCHER_ERROR = 4


class EmulatorError(RuntimeError):
    """The emulated launch failed: ``returncode`` and ``stderr`` say how."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode = returncode
        self.stderr = stderr
        what = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
        super().__init__(f"emulator failed ({what}):\n{stderr}")


def _rewrite_launches(src: str) -> str:
    """``k<<<g, b, s, st>>>(`` -> ``::bct_emu::launcher(k, "k", g, b, s, st)(`` (line count kept)."""
    pattern = re.compile(r"^(\s*)(\S.*?)<<<(.*?)>>>\(", re.M)
    out, n = pattern.subn(
        lambda m: f'{m.group(1)}::bct_emu::launcher({m.group(2)}, "{m.group(2)}", {m.group(3)})(',
        src)
    if n == 0 or "<<<" in out:
        raise RuntimeError("could not rewrite every kernel launch")
    return out


def _sources() -> list[Path]:
    files = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh"))
    files += sorted(EMU_DIR.iterdir()) + sorted(INCLUDE_DIR.rglob("*.h"))
    return [f for f in files if f.is_file()]


def _cache_root() -> Path:
    return Path(os.environ.get("BCT_FAST_EMU_CACHE", Path(tempfile.gettempdir()) / "bct_fast_emu"))


def require_built() -> Path:
    """For a test fixture: skip where the emulator cannot run (not Linux, no ``CXX``), else the
    default driver, built once and cached."""
    import sys

    import pytest

    if sys.platform != "linux" or shutil.which(CXX) is None:
        pytest.skip("the kernel emulator needs Linux (ucontext, mmap) and g++")
    return build()


def _digest(extra: list[str], files: list[Path]) -> str:
    """Hash of the sources, the compiler and the flags: the cache key of a build."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join([CXX, version] + FLAGS + KERNEL_FLAGS + extra).encode())
    return h.hexdigest()[:16]


def _compile_and_link(out: Path, base: list[str], front: dict[str, list[str]],
                      link: list[str]) -> None:
    """Compiles ``front`` (object -> command) and the emulated kernels, and links ``out``.

    Link order matters (smem_marker.cpp): the kernel objects, and only they, lie between the two
    markers, whose addresses bracket the kernels' ``static`` (= __shared__) arrays."""
    with open(out.parent / ".lock", "w") as lock:  # one builder at a time (pytest-xdist)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return
        work = Path(tempfile.mkdtemp(dir=out.parent))
        for name in KERNEL_SOURCES:
            src = (CUDA_DIR / f"{name}.cu").read_text()
            (work / f"{name}.cu.inc").write_text(
                f'#line 1 "{CUDA_DIR / name}.cu"\n' + _rewrite_launches(src))
        base = base + [f"-I{work}"]
        marker = str(EMU_DIR / "smem_marker.cpp")
        jobs = {
            **{obj: base + cmd for obj, cmd in front.items()},
            "cuda_shim.o": base + ["-c", str(EMU_DIR / "cuda_shim.cpp")],
            "kernel_registry.o": base + ["-c", str(EMU_DIR / "kernel_registry.cpp")],
            "smem_begin.o": base + ["-DBCT_EMU_MARKER=bct_emu_smem_begin", "-c", marker],
            **{f"{n}.o": base + KERNEL_FLAGS + ["-c", str(EMU_DIR / f"{n}.cpp")]
               for n in KERNEL_OBJECTS},
            "smem_end.o": base + ["-DBCT_EMU_MARKER=bct_emu_smem_end", "-c", marker],
        }

        def compile_one(item):
            obj, cmd = item
            r = subprocess.run(cmd + ["-o", str(work / obj)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{r.stderr}")

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(compile_one, jobs.items()))
        tmp = work / out.name
        r = subprocess.run([CXX, *link, "-o", str(tmp), *[str(work / o) for o in jobs]],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator link failed:\n{r.stderr}")
        os.replace(tmp, out)
        shutil.rmtree(work, ignore_errors=True)


def build(variant: str | None = None) -> Path:
    """The driver executable for ``variant`` (None, or a key of BREAKS), built once and cached."""
    extra = BREAKS[variant]
    out_dir = _cache_root() / f"{variant or 'default'}-{_digest(extra, _sources())}"
    exe = out_dir / "bct_emu_driver"
    if not exe.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        base = [CXX, *FLAGS, *extra, f"-I{INCLUDE_DIR}", f"-I{CUDA_DIR}"]
        _compile_and_link(exe, base, {"driver_main.o": ["-c", str(EMU_DIR / "driver_main.cpp")]}, [])
    return exe


# The binding module's compile-time facts (CMakeLists.txt sets them for the real build).
_BINDING_DEFINES = ["-DBCT_FAST_WITH_CUDA=1", '-DBCT_FAST_VERSION="emulated"',
                    '-DBCT_FAST_CUDA_COMPILER_VERSION="none (CPU emulator)"',
                    '-DBCT_FAST_CUDA_ARCHS="emulated"',
                    *[f'-DBCT_FAST_HASH_{f.upper()}="emulated"' for f in KERNEL_SOURCES]]


def build_bindings() -> Path:
    """``csrc/bindings.cpp`` (unchanged) built against the emulated launchers into a Python
    extension module ``_C``: the raw-pointer glue of every launch can run on the CPU.

    Load it with :func:`load_bindings` in a child process (a kernel fault ends that process)."""
    import sysconfig

    import pybind11

    binding_files = [ROOT / "csrc" / "bindings.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    key = _digest(includes + _BINDING_DEFINES, _sources() + binding_files)
    out = _cache_root() / f"bindings-{key}" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        base = [CXX, *FLAGS, "-fPIC", *_BINDING_DEFINES, *includes, f"-I{INCLUDE_DIR}", f"-I{CUDA_DIR}"]
        front = {"bindings.o": ["-fvisibility=hidden", "-c", str(binding_files[0])],
                 **{f"{f.stem}.o": ["-c", str(f)] for f in binding_files[1:]},
                 "bindings_emu.o": ["-c", str(EMU_DIR / "bindings_emu.cpp")]}
        _compile_and_link(out, base, front, ["-shared"])
    return out


def load_bindings(path: Path):
    """Imports the module :func:`build_bindings` made (as ``_C``, not registered in sys.modules)
    and registers its kernels with the emulator."""
    import ctypes
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ctypes.CDLL(str(path)).bct_emu_register_all()  # the same handle: dlopen of a loaded path
    return mod


def _symbolize(exe: Path, stderr: str) -> str:
    """Names the __shared__ variable behind each "[nm 0x...]" address of an error message."""
    addrs = [int(a, 16) for a in re.findall(r"\[nm 0x([0-9a-f]+)\]", stderr)]
    if not addrs:
        return stderr
    syms = []
    for line in subprocess.run(["nm", "-C", "-S", "--defined-only", str(exe)],
                               capture_output=True, text=True).stdout.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[2] in "bB":
            syms.append((int(parts[0], 16), int(parts[1], 16), parts[3]))
    for a in addrs:
        for start, size, name in syms:
            if start <= a < start + size:
                name = name.replace("(anonymous namespace)::", "")
                name = re.sub(r"\([^()]*\)", "", name)  # drop the kernel's parameter list
                stderr = stderr.replace(f"[nm 0x{a:x}]", f"'{name}' + {a - start} bytes")
    return stderr


def run(op: str, arrays: dict[str, np.ndarray], params: dict, seeds=(1,),
        variant: str | None = None, timeout: float = 120.0) -> dict[str, bytes]:
    """Runs one launcher in the emulator. ``arrays`` are the inputs (raw bytes are passed as-is:
    give bf16 as uint16 bits), ``params`` the scalars of request.txt. Returns each output's bytes."""
    exe = build(variant)
    with tempfile.TemporaryDirectory(prefix="bct_emu_") as d:
        lines = [f"op {op}", "seeds " + ",".join(str(s) for s in seeds)]
        lines += [f"{k} {int(v) if isinstance(v, bool) else v}" for k, v in params.items()]
        Path(d, "request.txt").write_text("\n".join(lines) + "\n")
        for name, a in arrays.items():
            if a is not None:
                Path(d, f"{name}.bin").write_bytes(np.ascontiguousarray(a).tobytes())
        r = subprocess.run([str(exe), d], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise EmulatorError(r.returncode, _symbolize(exe, r.stderr))
        return {p.name[: -len(".out.bin")]: p.read_bytes() for p in Path(d).glob("*.out.bin")}


# ---- dtype helpers (numpy has no bfloat16) ---------------------------------------------------

def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (as __float2bfloat16 and torch)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(array to pass to the kernel, its exact fp32 value) for dtype float32/float16/bfloat16."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x, x
    if dtype == "float16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    b = bf16_bits(x)
    return b, bf16_to_f32(b)
