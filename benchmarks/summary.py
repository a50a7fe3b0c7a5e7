"""Readable benchmark results: one provider-vs-provider table per benchmark function.

Rows are the shapes (every benchmark parameter but ``provider``), columns the providers, and a
cell is the median time, its ratio to the best PEER on that row (peers: ``faiss``, ``torch``,
``liger``, ``cce``, ``pml``: whichever ran)
and the peak extra memory (``peak_extra_mib``). Under each table: the row where each of our
providers (names starting with ``bct_fast``) does worst against the best peer.

Used at the end of every ``pytest benchmarks`` session (benchmarks/conftest.py) and standalone on
a saved JSON (pytest-benchmark's ``--benchmark-json`` file, or benchmarks/collect_results.py's)::

    python benchmarks/summary.py results.json [--out DIR]

writes ``DIR/<stem>.md`` and PNG plots (``DIR/<stem>_<benchmark>_vs_N.png`` etc.; DIR defaults
to the JSON's folder) and prints the tables.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ("faiss", "torch", "liger", "cce", "pml")  # the libraries users compare us with
OURS_PREFIX = "bct_fast"
PLOT_AXES = ("N", "k")  # line plots of time against these parameters, where a benchmark has them

Shape = tuple  # the values of Table.params, in order


@dataclass(frozen=True)
class Case:
    """One measured benchmark case."""
    family: str                # the test function, e.g. "test_cpu_search"
    params: tuple[tuple[str, object], ...]  # every parameter but the provider, in pytest's order
    provider: str
    median_s: float
    peak_mib: float | None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Table:
    """One benchmark function's cases, arranged as shapes x providers."""
    family: str
    params: list[str]
    providers: list[str]
    cells: dict[tuple[Shape, str], Case]
    constants: dict  # extra_info fields with one value over the whole table (d, device, ...)

    @property
    def shapes(self) -> list[Shape]:
        """Row keys in the order the cases ran."""
        seen: dict[Shape, None] = {}
        for shape, _ in self.cells:
            seen.setdefault(shape, None)
        return list(seen)

    @property
    def title(self) -> str:
        return self.family.removeprefix("test_")


@dataclass(frozen=True)
class Worst:
    """The row where one of our providers is slowest relative to the best peer."""
    provider: str
    shape: Shape
    ratio: float
    seconds: float
    peer: str
    peer_seconds: float


# ---- reading ------------------------------------------------------------------------------------

def is_ours(provider: str) -> bool:
    return provider.startswith(OURS_PREFIX)


def _plain(value: object) -> object:
    """JSON-friendly parameter values (torch dtypes and other objects become their text)."""
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _median(bench: dict) -> float:
    """pytest-benchmark writes ``stats``; collect_results.py writes ``stats_s``."""
    stats = bench.get("stats") or bench.get("stats_s") or {}
    return float(stats["median"])


def case_from_bench(bench: dict) -> Case:
    """One entry of a pytest-benchmark JSON's ``benchmarks`` list as a :class:`Case`."""
    name = bench.get("name") or bench.get("fullname", "")
    family = name.split("::")[-1].split("[")[0]
    params = dict(bench.get("params") or {})
    extra = dict(bench.get("extra_info") or {})
    provider = str(params.pop("provider", extra.get("provider", "?")))
    peak = extra.get("peak_extra_mib")
    return Case(family, tuple((k, _plain(v)) for k, v in params.items()), provider, _median(bench),
                None if peak is None else float(peak), extra)


def cases_from_doc(doc: dict) -> list[Case]:
    """Every case of a saved pytest-benchmark (or collect_results.py) JSON document."""
    return [case_from_bench(b) for b in doc.get("benchmarks", [])]


def _constants(cases: list[Case], params: list[str]) -> dict:
    """extra_info fields (not parameters) that have a single value over ``cases``."""
    keys = set.intersection(*(set(c.extra) for c in cases)) if cases else set()
    skip = set(params) | {"provider", "peak_extra_mib"}
    out = {}
    for key in sorted(keys - skip):
        values = {json.dumps(c.extra[key], sort_keys=True, default=str) for c in cases}
        if len(values) == 1:
            out[key] = _plain(cases[0].extra[key])
    return out


def build_tables(cases: list[Case]) -> list[Table]:
    """Group cases by benchmark function (in the order they ran) into tables."""
    families: dict[str, list[Case]] = {}
    for c in cases:
        families.setdefault(c.family, []).append(c)
    tables = []
    for family, group in families.items():
        params = list(dict.fromkeys(k for c in group for k, _ in c.params))
        providers = list(dict.fromkeys(c.provider for c in group))
        # ours first, then the peers: the eye reads our column against those to its right
        providers = [p for p in providers if is_ours(p)] + [p for p in providers if not is_ours(p)]
        cells = {(tuple(dict(c.params).get(k) for k in params), c.provider): c for c in group}
        tables.append(Table(family, params, providers, cells, _constants(group, params)))
    return tables


# ---- ratios -------------------------------------------------------------------------------------

def best_peer(table: Table, shape: Shape) -> tuple[str, float] | None:
    """The fastest peer provider on one row, as (provider, median seconds); None without peers."""
    times = [(table.cells[(shape, p)].median_s, p) for p in table.providers
             if p in PEERS and (shape, p) in table.cells]
    if not times:
        return None
    seconds, provider = min(times)
    return provider, seconds


def ratio(table: Table, shape: Shape, provider: str) -> float | None:
    """Median time of ``provider`` / the best peer's on that row (< 1: faster than every peer)."""
    peer = best_peer(table, shape)
    case = table.cells.get((shape, provider))
    if peer is None or case is None or peer[1] <= 0:
        return None
    return case.median_s / peer[1]


def worst_rows(table: Table) -> list[Worst]:
    """For each of our providers, the row with the highest ratio to the best peer."""
    out = []
    for provider in (p for p in table.providers if is_ours(p)):
        scored = [(r, shape) for shape in table.shapes if (r := ratio(table, shape, provider)) is not None]
        if not scored:
            continue
        r, shape = max(scored, key=lambda t: t[0])
        peer, peer_s = best_peer(table, shape)
        out.append(Worst(provider, shape, r, table.cells[(shape, provider)].median_s, peer, peer_s))
    return out


# ---- text ---------------------------------------------------------------------------------------

def fmt_value(value: object) -> str:
    """Shape values as people write them: 1000000 -> 1M, 200000 -> 200k; other values as text."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        for div, suffix in ((1_000_000, "M"), (1_000, "k")):
            if value % div == 0:
                return f"{value // div}{suffix}"
    return str(value)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 10:
        return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.1f} s"


def shape_label(table: Table, shape: Shape) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in zip(table.params, shape))


def cell_text(table: Table, shape: Shape, provider: str) -> str:
    """``median  ratio  peak``, or "-" where the case did not run (skipped or deselected)."""
    case = table.cells.get((shape, provider))
    if case is None:
        return "-"
    r = ratio(table, shape, provider)
    parts = [fmt_time(case.median_s), "" if r is None else f"{r:.2f}x"]
    if case.peak_mib is not None:
        parts.append(f"{case.peak_mib:.0f} MiB")
    return " ".join(p for p in parts if p)


def worst_text(table: Table) -> list[str]:
    """Plain sentences naming our worst row(s)."""
    worst = worst_rows(table)
    if not worst:
        return ["no peer ran beside bct_fast here: no ratio to report"]
    lines = []
    for w in worst:
        verdict = "slower than" if w.ratio > 1 else "still faster than"
        lines.append(f"worst row for {w.provider}: {shape_label(table, w.shape)}: {fmt_time(w.seconds)}, "
                     f"{w.ratio:.2f}x the best peer ({w.peer}, {fmt_time(w.peer_seconds)}; {verdict} it)")
    return lines


def _grid(table: Table) -> tuple[list[str], list[list[str]]]:
    header = [*table.params, *table.providers]
    rows = [[fmt_value(v) for v in shape] + [cell_text(table, shape, p) for p in table.providers]
            for shape in table.shapes]
    return header, rows


def _caption(table: Table) -> str:
    consts = ", ".join(f"{k}={fmt_value(v)}" for k, v in table.constants.items())
    return ("cells: median time, ratio to the best peer (" + "/".join(PEERS) + "; < 1 = faster), peak extra memory"
            + (f"; {consts}" if consts else ""))


def render_text(tables: list[Table]) -> str:
    """Fixed-width tables for the terminal."""
    out = []
    for table in tables:
        header, rows = _grid(table)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        out += [f"{table.title}  ({_caption(table)})", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        out += [*worst_text(table), ""]
    return "\n".join(out)


def render_markdown(tables: list[Table], title: str = "Benchmark summary") -> str:
    """The same tables as Markdown."""
    out = [f"# {title}", ""]
    for table in tables:
        header, rows = _grid(table)
        out += [f"## {table.title}", "", _caption(table) + ".", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += [""] + [f"- {s}" for s in worst_text(table)] + [""]
    return "\n".join(out)


# ---- plots --------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path: Path) -> Path:
    """PNG written atomically (a reader never sees half a file)."""
    from bct_fast._core.io import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=110)
    _pyplot().close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_against(table: Table, axis: str, path: Path) -> Path:
    """Median time vs one parameter (log-log): a colour per provider, a marker per combination
    of the other parameters; points of one (provider, combination) are joined."""
    plt = _pyplot()
    i = table.params.index(axis)
    others = [k for k in table.params if k != axis]
    rest = lambda shape: tuple(v for j, v in enumerate(shape) if j != i)  # noqa: E731
    combos = list(dict.fromkeys(rest(s) for s in table.shapes))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>pPX*h"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for pi, provider in enumerate(table.providers):
        for ci, combo in enumerate(combos):
            pts = sorted((s[i], table.cells[(s, provider)].median_s) for s in table.shapes
                         if rest(s) == combo and (s, provider) in table.cells)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[pi % len(colors)],
                        marker=markers[ci % len(markers)], linestyle="-", alpha=0.85)
    handles = [plt.Line2D([], [], color=colors[pi % len(colors)], label=p) for pi, p in enumerate(table.providers)]
    handles += [plt.Line2D([], [], color="gray", marker=markers[ci % len(markers)], linestyle="",
                           label=" ".join(f"{k}={fmt_value(v)}" for k, v in zip(others, combo)))
                for ci, combo in enumerate(combos)]
    ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="median time (s)",
           title=f"{table.title}: time vs {axis}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    return _save_fig(fig, path)


def plot_bars(table: Table, path: Path) -> Path:
    """Median time per shape (log scale), one bar per provider."""
    plt = _pyplot()
    shapes = table.shapes
    width = 0.8 / max(1, len(table.providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shapes) + 2), 5))
    for pi, provider in enumerate(table.providers):
        xs = [si + pi * width for si, s in enumerate(shapes) if (s, provider) in table.cells]
        ys = [table.cells[(s, provider)].median_s for s in shapes if (s, provider) in table.cells]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([si + width * (len(table.providers) - 1) / 2 for si in range(len(shapes))])
    ax.set_xticklabels(["\n".join(f"{k}={fmt_value(v)}" for k, v in zip(table.params, s)) for s in shapes],
                       fontsize=7)
    ax.set(yscale="log", ylabel="median time (s)", title=f"{table.title}: time per shape")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save_fig(fig, path)


def plot_table(table: Table, stem: Path) -> list[Path]:
    """Line plots against N and k where the benchmark varies them, else a bar chart."""
    axes = [a for a in PLOT_AXES if a in table.params
            and len({s[table.params.index(a)] for s in table.shapes}) > 1
            and all(isinstance(s[table.params.index(a)], (int, float)) for s in table.shapes)]
    if axes:
        return [plot_against(table, a, stem.with_name(f"{stem.name}_{table.title}_vs_{a}.png")) for a in axes]
    return [plot_bars(table, stem.with_name(f"{stem.name}_{table.title}.png"))]


# ---- outputs ------------------------------------------------------------------------------------

def write_outputs(tables: list[Table], stem: Path, title: str, plots: bool = True) -> list[Path]:
    """``<stem>.md`` and the plots beside it, each written atomically."""
    from bct_fast._core.io import atomic_write

    text = render_markdown(tables, title).encode()
    written = [atomic_write(stem.with_name(stem.name + ".md"), lambda f: f.write(text))]
    if plots:
        for table in tables:
            written += plot_table(table, stem)
    return written


def summarize_file(json_path: Path, out_dir: Path | None = None, plots: bool = True) -> tuple[str, list[Path]]:
    """Tables of a saved JSON as text, and the files written (Markdown, PNGs) into ``out_dir``
    (default: the JSON's folder)."""
    doc = json.loads(Path(json_path).read_text())
    tables = build_tables(cases_from_doc(doc))
    if not tables:
        raise ValueError("no benchmark cases in it (not a pytest-benchmark JSON?)")
    stem = Path(out_dir or Path(json_path).parent) / Path(json_path).stem
    return render_text(tables), write_outputs(tables, stem, f"Benchmark summary: {Path(json_path).name}", plots)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path, help="a pytest-benchmark --benchmark-json file (or collect_results.py's)")
    ap.add_argument("--out", type=Path, help="folder for the .md and .png files (default: the JSON's folder)")
    ap.add_argument("--no-plots", action="store_true", help="Markdown only (no matplotlib needed)")
    a = ap.parse_args(argv)
    try:
        text, written = summarize_file(a.json, a.out, plots=not a.no_plots)
    except (OSError, ValueError, KeyError) as e:
        print(f"summary.py: {a.json}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
