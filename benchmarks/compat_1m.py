"""``bct-fast compat`` on a 1M-row memory-mapped gallery per model: wall time and peak memory.

Writes into a temporary folder, for two models (old, new), a clustered synthetic gallery of
``--rows`` x ``--dim`` float32 rows (a .npy that ``bct-fast compat`` memory-maps), ``--queries``
queries per model and the labels; then runs ``bct-fast compat`` on it in a subprocess and
records its wall time and peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``). The point: the
search reads the gallery by chunks, so peak memory should stay far below one gallery's size.

While the subprocess runs, /proc/<pid>/status is sampled, so the peak is also split into
anonymous memory (what the process allocated) and file-backed pages (memory-mapped gallery
pages that are resident in the process; the kernel can drop those, as they are clean page
cache). A small-gallery run of the same command first gives the baseline (Python + torch).

    nice -n 10 python benchmarks/compat_1m.py [--out benchmarks/results/compat_1m_<date>.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bct_fast._core.io import atomic_write

MODELS = ("old", "new")
WRITE_CHUNK = 1 << 16  # gallery rows generated and written per step: bounded memory here too


def centres(classes: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Unit class centres per model; the new model's are the old ones moved part of the way
    toward other random directions (a partly compatible model, so both verdicts are possible)."""
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((classes, dim), dtype=np.float32)
    new = old + 1.0 * rng.standard_normal((classes, dim), dtype=np.float32)
    return {m: (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32) for m, c in zip(MODELS, (old, new))}


def samples(c: np.ndarray, labels: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Rows around the centres of ``labels`` (isotropic noise of ``noise`` per unit dimension)."""
    scale = noise / np.sqrt(c.shape[1])
    return c[labels] + scale * rng.standard_normal((len(labels), c.shape[1]), dtype=np.float32)


def write_gallery(path: Path, c: np.ndarray, labels: np.ndarray, seed: int, noise: float) -> None:
    """A [rows, dim] float32 .npy written through a memmap, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(labels), c.shape[1]))
    rng = np.random.default_rng(seed)
    for r0 in range(0, len(labels), WRITE_CHUNK):
        out[r0:r0 + WRITE_CHUNK] = samples(c, labels[r0:r0 + WRITE_CHUNK], rng, noise)
    out.flush()
    del out


def write_dataset(folder: Path, rows: int, dim: int, queries: int, classes: int, seed: int,
                  noise: float = 1.2) -> dict:
    """Every file ``bct-fast compat`` needs; returns their paths."""
    rng = np.random.default_rng(seed + 1)
    gallery_labels = rng.integers(0, classes, rows, dtype=np.int64)
    query_labels = rng.integers(0, classes, queries, dtype=np.int64)
    files = {"gallery_labels": folder / "gallery_labels.npy", "query_labels": folder / "query_labels.npy"}
    np.save(files["gallery_labels"], gallery_labels)
    np.save(files["query_labels"], query_labels)
    for i, (model, c) in enumerate(centres(classes, dim, seed).items()):
        # both models embed the same images: the same labels, independent noise per model
        files[f"{model}_queries"] = folder / f"{model}_queries.npy"
        np.save(files[f"{model}_queries"], samples(c, query_labels, np.random.default_rng(seed + 10 + i), noise))
        files[f"{model}_gallery"] = folder / f"{model}_gallery.npy"
        write_gallery(files[f"{model}_gallery"], c, gallery_labels, seed + 20 + i, noise)
    return files


def compat_argv(files: dict, out: Path) -> list[str]:
    """The ``bct-fast compat`` command line (the installed script, else ``python -m bct_fast.cli``)."""
    exe = shutil.which("bct-fast", path=str(Path(sys.executable).parent)) or shutil.which("bct-fast")
    head = [exe] if exe else [sys.executable, "-m", "bct_fast.cli"]
    models = [f"{m}={files[f'{m}_queries']},{files[f'{m}_gallery']}" for m in MODELS]
    return [*head, "compat", "--model", models[0], "--model", models[1], "--query-labels",
            str(files["query_labels"]), "--gallery-labels", str(files["gallery_labels"]), "--out", str(out),
            "--no-progress", "--no-plot"]


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of a live process, in KiB ({} once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def run_measured(argv: list[str], poll_s: float = 0.05) -> dict:
    """Run ``argv``; wall time, and the peaks seen by sampling /proc (MiB)."""
    peaks: dict[str, int] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while proc.poll() is None:
        for key, kib in _status_kib(proc.pid).items():
            peaks[key] = max(peaks.get(key, 0), kib)
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"bct-fast compat failed ({proc.returncode}):\n{output}")
    return {"wall_s": round(wall, 2), "output": output.strip().splitlines(),
            "sampled_peak_mib": {k: round(v / 1024, 1) for k, v in sorted(peaks.items())}}


def children_maxrss_mib() -> float:
    """Largest peak RSS of any waited-for child so far (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def measure(rows: int, dim: int, queries: int, classes: int, seed: int, folder: Path) -> dict:
    """Write one dataset into ``folder``, run compat on it, return the figures."""
    t0 = time.perf_counter()
    files = write_dataset(folder, rows, dim, queries, classes, seed)
    write_s = time.perf_counter() - t0
    run = run_measured(compat_argv(files, folder / "out"))
    doc = json.loads((folder / "out" / "compat.json").read_text())
    return {"rows": rows, "dim": dim, "queries": queries, "classes": classes,
            "gallery_mib_per_model": round(rows * dim * 4 / 2**20, 1), "write_s": round(write_s, 1),
            **run, "ru_maxrss_children_mib": children_maxrss_mib(), "k": doc["k"],
            "cross_test": {k: doc["cross_test"][k] for k in ("old_old", "new_new", "new_old", "compatible")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--classes", type=int, default=20_000, help="gallery classes (~rows/classes rows each)")
    ap.add_argument("--baseline-rows", type=int, default=10_000, help="the small run first (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", help="parent folder for the temporary data (default: the system's)")
    ap.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/compat_1m_<date>.json)")
    a = ap.parse_args(argv)
    out = a.out or Path(__file__).parent / "results" / f"compat_1m_{dt.date.today().isoformat()}.json"
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
              "command": "bct-fast compat --model old=Q,G --model new=Q,G --query-labels .. --gallery-labels .. "
                         "--no-plot --no-progress (k=auto)"}
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="compat_1m_") as tmp:
        if a.baseline_rows:
            base = Path(tmp) / "baseline"
            base.mkdir()
            # run first: ru_maxrss is a maximum over all children, so the big run's figure stays its own
            result["baseline"] = measure(a.baseline_rows, a.dim, a.queries, min(a.classes, a.baseline_rows // 10),
                                         a.seed, base)
            shutil.rmtree(base)
        big = Path(tmp) / "big"
        big.mkdir()
        result["gallery"] = measure(a.rows, a.dim, a.queries, a.classes, a.seed, big)
    g = result["gallery"]
    print(f"{a.rows:,} x {a.dim} float32 gallery per model ({g['gallery_mib_per_model']} MiB each, two models): "
          f"compat took {g['wall_s']} s, peak RSS {g['ru_maxrss_children_mib']} MiB "
          f"(sampled: {g['sampled_peak_mib']})")
    if "baseline" in result:
        b = result["baseline"]
        print(f"baseline ({a.baseline_rows:,} rows): {b['wall_s']} s, peak RSS {b['ru_maxrss_children_mib']} MiB "
              f"(sampled: {b['sampled_peak_mib']})")
    data = (json.dumps(result, indent=1) + "\n").encode()
    atomic_write(out, lambda f: f.write(data))  # never a half-written result under the final name
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
