"""benchmarks/conftest.py's row record and collect_results.py: a benchmark run stopped by the
lease's deadline (pytest-benchmark writes its JSON only at the end) keeps the rows it finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = "B64-C100-d64-torch-forward-trainable"


def test_rows_of_a_run_without_its_json_reach_the_collected_json(tmp_path):
    record = tmp_path / "rows_bench.jsonl"
    env = dict(os.environ, BCT_FAST_BENCH_RECORD=str(record))
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_margin_ce.py", "-k", ROW, "-q",
                        "-p", "no:cacheprovider", "--benchmark-only"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = record.read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["name"].endswith(f"[{ROW}]") and row["extra_info"]["provider"] == "torch"
    assert row["stats_s"]["rounds"] == 30 and 0 < row["stats_s"]["min"] <= row["stats_s"]["median"]
    with open(record, "a") as f:
        f.write('{"name": "cut short by a ki')  # what a kill mid-write leaves

    # The same row also in a (complete) pytest-benchmark JSON: it is taken once, from the JSON.
    raw = tmp_path / "raw_bench.json"
    raw.write_text(json.dumps({"benchmarks": [{
        "fullname": row["name"], "params": {}, "extra_info": {"from": "json"},
        "stats": {"min": 1.0, "median": 1.0, "mean": 1.0, "stddev": 0.0, "rounds": 3}}]}))
    for bench, source in (([str(tmp_path / "missing.json"), str(record)], "record"),
                          ([str(record), str(raw)], "json")):
        out = tmp_path / f"gpu_{source}.json"
        r = subprocess.run([sys.executable, "benchmarks/collect_results.py", "--out", str(out), "--bench", *bench],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.loads(out.read_text())["benchmarks"]
        assert [x["name"] for x in rows] == [row["name"]], source
        assert (rows[0]["extra_info"].get("from") == "json") == (source == "json")
