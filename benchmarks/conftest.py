"""Benchmark helpers: case grids (quick / --full), synchronised timing targets, peak-memory
probes, and a readable summary at the end of the session (benchmarks/summary.py).

Run: pytest benchmarks --benchmark-only [--full] [--benchmark-json=out.json]. By default a few
representative shapes per benchmark run (a couple of minutes on a 2-core CPU); ``--full`` runs
the whole grid. With ``--benchmark-json=out.json`` the summary is also written to ``out.md`` with
PNG plots beside it. CUDA cases carry the `cuda` marker and are skipped without a GPU +
compiled kernels.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from bct_fast.testing import skip_cuda_items


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="bct_fast benchmarks: run the full case grids (default: the quick subsets)")


def pytest_configure(config):
    config.addinivalue_line("markers", "grid(names, quick, full): parametrize `names` (\"Q,N,k\") with the "
                            "`quick` case list, or with `full` under --full")


def case_id(names: list[str], case: tuple) -> str:
    """``Q1-N1000000-k100``: each parameter's name and value (the ids earlier results used)."""
    return "-".join(f"{n}{v}" for n, v in zip(names, case))


def pytest_generate_tests(metafunc):
    """Expand a ``grid`` marker into the quick or (with --full) the full case list."""
    mark = metafunc.definition.get_closest_marker("grid")
    if mark is None:
        return
    names, quick, full = mark.args
    cases = full if metafunc.config.getoption("full", default=False) else quick
    names = [n.strip() for n in names.split(",")]
    metafunc.parametrize(names, cases, ids=[case_id(names, c) for c in cases])


def pytest_collection_modifyitems(config, items):
    skip_cuda_items(items)


def _summary_module():
    """benchmarks/summary.py, loaded by path (benchmarks/ is not a package)."""
    name = "bct_fast_bench_summary"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("summary.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the provider-vs-provider tables; with --benchmark-json also save them (.md, .png)."""
    session = getattr(config, "_benchmarksession", None)
    benches = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", None) or [] if b]
    if not benches:
        return
    summary = _summary_module()
    tables = summary.build_tables(summary.cases_from_doc({"benchmarks": benches}))
    terminalreporter.write_sep("=", "bct_fast benchmark summary")
    for line in summary.render_text(tables).splitlines():
        terminalreporter.write_line(line)
    json_path = config.getoption("benchmark_json", default=None)
    if json_path:
        # a Path in pytest-benchmark 4+; an open file (whose .name is its path) in older versions
        json_path = Path(json_path if isinstance(json_path, (str, os.PathLike)) else json_path.name)
        try:
            written = summary.write_outputs(tables, json_path.with_suffix(""), f"Benchmark summary: {json_path.name}")
        except (OSError, ImportError) as e:  # a summary must never fail the benchmark run
            terminalreporter.write_line(f"summary not saved: {type(e).__name__}: {e}")
        else:
            terminalreporter.write_line("summary saved: " + ", ".join(str(p) for p in written))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory allocated by one call of ``fn`` beyond what was live before it.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the resident-set high-water mark, reset
    through /proc/self/clear_refs, so it counts every allocator, not just torch's."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:  # hand freed heap pages back to the OS so the high-water mark sees new allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


# gpu_session.sh: a JSON-lines file that gets one line per benchmark row as it finishes.
# pytest-benchmark writes its JSON only when the run ends, so a run stopped by the lease's
# deadline kept none of its rows; collect_results.py reads these lines too.
BENCH_RECORD_ENV = "BCT_FAST_BENCH_RECORD"


def _record_row(nodeid: str, params: dict, benchmark) -> None:
    path = os.environ.get(BENCH_RECORD_ENV)
    if not path:
        return
    s = benchmark.stats.stats
    row = {"name": nodeid, "params": {k: str(v) for k, v in params.items()},
           "extra_info": dict(benchmark.extra_info),
           "stats_s": {k: getattr(s, k) for k in ("min", "median", "mean", "stddev", "rounds")}}
    with open(path, "a") as f:  # one short write per line: a kill leaves at most one cut line
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture
def measure(benchmark, request):
    """measure(fn, device, rounds): time ``fn`` (synchronised) and record its peak extra memory."""

    def run(fn, device: str, rounds: int = 3, **info):
        def target():
            fn()
            sync(device)

        benchmark.extra_info.update(info, device=device)
        benchmark.extra_info["peak_extra_mib"] = round(peak_extra_bytes(target, device) / 2**20, 1)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)
        callspec = getattr(request.node, "callspec", None)
        _record_row(request.node.nodeid, callspec.params if callspec else {}, benchmark)

    return run
