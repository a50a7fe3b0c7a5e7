"""benchmarks/summary.py (the readable benchmark tables) and the quick / --full case grids.

No timing is measured here: the summary runs on a small synthetic pytest-benchmark JSON."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = ROOT / "benchmarks" / "summary.py"


@pytest.fixture(scope="module")
def summary():
    name = "bct_fast_bench_summary_under_test"
    spec = importlib.util.spec_from_file_location(name, SUMMARY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def bench(func: str, provider: str, median: float, peak: float, **params) -> dict:
    """One entry as pytest-benchmark's --benchmark-json writes it (the fields the summary reads)."""
    ids = "-".join(f"{k}{v}" for k, v in params.items())
    return {"name": f"{func}[{ids}-{provider}]", "fullname": f"benchmarks/bench_x.py::{func}[{ids}-{provider}]",
            "params": {**params, "provider": provider},
            "extra_info": {**params, "provider": provider, "d": 512, "device": "cpu", "peak_extra_mib": peak},
            "stats": {"min": median * 0.9, "median": median, "mean": median, "stddev": 0.0, "rounds": 3}}


# search: bct_fast beats both peers on the first row, loses to faiss (1.5x) on the second; the
# third row has no torch (skipped) and bct_fast at 1.2x faiss. Margin CE: no faiss at all.
SEARCH = [("bct_fast", 0.05, 6.0, dict(Q=1, N=1_000_000, k=100)), ("faiss", 0.10, 1.0, dict(Q=1, N=1_000_000, k=100)),
          ("torch", 0.20, 20.0, dict(Q=1, N=1_000_000, k=100)),
          ("bct_fast", 0.30, 37.0, dict(Q=1000, N=100_000, k=10)), ("faiss", 0.20, 5.0, dict(Q=1000, N=100_000, k=10)),
          ("torch", 0.25, 388.0, dict(Q=1000, N=100_000, k=10)),
          ("bct_fast", 0.60, 109.0, dict(Q=1000, N=200_000, k=1000)),
          ("faiss", 0.50, 38.0, dict(Q=1000, N=200_000, k=1000))]
MARGIN = [("bct_fast", 0.010, 30.0, dict(B=256, C=10_000, mode="forward")),
          ("torch", 0.020, 70.0, dict(B=256, C=10_000, mode="forward")),
          ("bct_fast", 0.035, 80.0, dict(B=256, C=10_000, mode="full")),
          ("torch", 0.050, 150.0, dict(B=256, C=10_000, mode="full"))]


@pytest.fixture
def doc() -> dict:
    return {"benchmarks": [bench("test_cpu_search", p, t, m, **kw) for p, t, m, kw in SEARCH]
            + [bench("test_margin_ce_cpu", p, t, m, **kw) for p, t, m, kw in MARGIN]}


def tables_by_title(summary, doc):
    return {t.title: t for t in summary.build_tables(summary.cases_from_doc(doc))}


def test_tables_group_by_benchmark_and_put_ours_first(summary, doc):
    tables = tables_by_title(summary, doc)
    assert list(tables) == ["cpu_search", "margin_ce_cpu"]
    search = tables["cpu_search"]
    assert search.params == ["Q", "N", "k"] and search.providers == ["bct_fast", "faiss", "torch"]
    assert search.shapes == [(1, 1_000_000, 100), (1000, 100_000, 10), (1000, 200_000, 1000)]
    assert search.constants == {"d": 512, "device": "cpu"}
    assert tables["margin_ce_cpu"].params == ["B", "C", "mode"]  # mode is a row parameter


def test_ratios_are_to_the_best_peer(summary, doc):
    t = tables_by_title(summary, doc)["cpu_search"]
    assert summary.best_peer(t, (1, 1_000_000, 100)) == ("faiss", 0.10)
    assert summary.ratio(t, (1, 1_000_000, 100), "bct_fast") == pytest.approx(0.5)
    assert summary.ratio(t, (1, 1_000_000, 100), "torch") == pytest.approx(2.0)
    assert summary.best_peer(t, (1000, 100_000, 10)) == ("faiss", 0.20)
    assert summary.ratio(t, (1000, 100_000, 10), "bct_fast") == pytest.approx(1.5)
    assert summary.ratio(t, (1000, 200_000, 1000), "torch") is None  # torch did not run there
    margin = tables_by_title(summary, doc)["margin_ce_cpu"]
    assert summary.ratio(margin, (256, 10_000, "full"), "bct_fast") == pytest.approx(0.7)


def test_worst_row_is_the_highest_ratio(summary, doc):
    tables = tables_by_title(summary, doc)
    (w,) = summary.worst_rows(tables["cpu_search"])
    assert (w.provider, w.shape, w.peer) == ("bct_fast", (1000, 100_000, 10), "faiss")
    assert w.ratio == pytest.approx(1.5)
    (line,) = summary.worst_text(tables["cpu_search"])
    assert line.startswith("worst row for bct_fast: Q=1000 N=100k k=10: 300.0 ms, 1.50x the best peer (faiss")
    (m,) = summary.worst_rows(tables["margin_ce_cpu"])
    assert m.shape == (256, 10_000, "full") and m.ratio == pytest.approx(0.7)


def test_no_peer_means_no_ratio(summary):
    only_ours = {"benchmarks": [bench("test_x", "bct_fast", 0.1, 1.0, N=10)]}
    (t,) = summary.build_tables(summary.cases_from_doc(only_ours))
    assert summary.worst_rows(t) == []
    assert "no peer" in summary.worst_text(t)[0]


def test_collect_results_format_is_read_too(summary, doc):
    """benchmarks/results/*.json (collect_results.py) keep the stats under ``stats_s``."""
    for b in doc["benchmarks"]:
        b["stats_s"] = b.pop("stats")
    t = tables_by_title(summary, doc)["cpu_search"]
    assert t.cells[((1, 1_000_000, 100), "bct_fast")].median_s == 0.05


def test_markdown_and_plots_are_written(summary, doc, tmp_path):
    tables = summary.build_tables(summary.cases_from_doc(doc))
    written = summary.write_outputs(tables, tmp_path / "run", "Benchmark summary: run.json")
    names = sorted(p.name for p in written)
    assert names == ["run.md", "run_cpu_search_vs_N.png", "run_cpu_search_vs_k.png", "run_margin_ce_cpu.png"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "run.md").read_text()
    assert "## cpu_search" in md and "## margin_ce_cpu" in md
    assert "| Q | N | k | bct_fast | faiss | torch |" in md
    assert "| 1 | 1M | 100 | 50.0 ms 0.50x 6 MiB | 100.0 ms 1.00x 1 MiB | 200.0 ms 2.00x 20 MiB |" in md
    assert "| 1000 | 200k | 1000 | 600.0 ms 1.20x 109 MiB | 500.0 ms 1.00x 38 MiB | - |" in md
    assert "- worst row for bct_fast: Q=1000 N=100k k=10" in md
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_standalone_cli(doc, tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "summary"
    r = subprocess.run([sys.executable, str(SUMMARY), str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "worst row for bct_fast: Q=1000 N=100k k=10" in r.stdout
    assert re.search(r"^\s+1\s+1M\s+100\s+50\.0 ms 0\.50x 6 MiB", r.stdout, re.M)
    assert sorted(p.name for p in out.iterdir()) == ["results.md", "results_cpu_search_vs_N.png",
                                                     "results_cpu_search_vs_k.png", "results_margin_ce_cpu.png"]
    bad = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr
    (tmp_path / "demo.json").write_text(json.dumps({"config": {}}))  # e.g. a demo result, no benchmarks
    empty = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path / "demo.json")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no benchmark cases" in empty.stderr
    assert not (tmp_path / "demo.md").exists()


def collected(*extra: str) -> int:
    """How many benchmark cases ``pytest benchmarks --collect-only`` finds (nothing runs)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    match = re.search(r"(\d+) tests? collected", r.stdout)
    assert match, r.stdout[-2000:]
    return int(match.group(1))


def test_full_option_runs_the_larger_grid():
    quick, full = collected(), collected("--full")
    assert quick < full
