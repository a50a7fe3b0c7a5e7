"""benchmarks/gpu_session.sh: every benchmark entry of its default run and of the lease plan's
second command selects rows (a -k filter that matches nothing spends a lease step on nothing, and
one that matches too much, like ``C100000`` matching C = 1,000,000, spends the lease's time)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "benchmarks" / "gpu_session.sh").read_text()


def _entries() -> list[str]:
    default = re.search(r'^DEFAULT_BENCH="(.*?)"', SCRIPT, re.M | re.S).group(1)
    second = re.search(r'^#\s+BCT_FAST_GPU_BENCH="(.*?)"', SCRIPT, re.M | re.S).group(1)
    second = re.sub(r"\n#\s*", " ", second)
    return (default.replace("\\\n", " ") + " " + second).split()


ENTRIES = _entries()


def _collected(entry: str) -> list[str]:
    path, _, k = entry.partition("@")
    args = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path]
    if k:
        args += ["-k", k.replace("+", " ")]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 5), r.stdout[-2000:] + r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if "::" in line]


def test_the_script_names_the_entries_this_test_reads():
    assert len(ENTRIES) == 9, ENTRIES
    assert all(Path(ROOT / e.partition("@")[0]).is_file() for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_bench_entry_selects_rows(entry):
    assert _collected(entry), f"{entry}: selects no benchmark"


def test_the_second_commands_loss_rows_leave_out_the_goal_shape():
    loss = [e for e in ENTRIES if "bench_margin_ce.py@(C100000" in e]
    assert len(loss) == 1
    rows = _collected(loss[0])
    assert not any("C1000000-" in r for r in rows)
    assert any("C100000-" in r for r in rows) and any("C200000-" in r for r in rows)
