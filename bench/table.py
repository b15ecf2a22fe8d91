"""Regenerate the results tables of bench/README.md from the newest bench/results/*.json.

Two tables: the GPU's, between the lines ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->``, from the newest GPU results file; the CPU's, between
``<!-- bench-table-cpu:start -->`` and ``<!-- bench-table-cpu:end -->``, from the newest
``<date>-cpu-<model>.json``. The rest of the README is left as it is, and so is a table whose kind
of file does not exist yet. ``make bench`` runs this after the benchmarks.

Usage: python bench/table.py [--results DIR] [--readme FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKERS = {"gpu": ("<!-- bench-table:start -->", "<!-- bench-table:end -->"),
           "cpu": ("<!-- bench-table-cpu:start -->", "<!-- bench-table-cpu:end -->")}
ROOFLINE_KEYS = ("roofline_fraction", "fraction_of_hbm")  # measured time's share of the roofline bound


def file_kind(path: Path) -> str:
    """``cpu``, ``smoke`` (never tabled) or ``gpu``, from a results file's name."""
    if "-cpu-" in path.name:
        return "cpu"
    return "smoke" if path.stem.endswith("-smoke") else "gpu"


def newest_results(folder: Path, kind: str = "gpu") -> Path | None:
    """The results file of ``kind`` with the latest date (file modification time breaks ties)."""
    files = [f for f in sorted(folder.glob("*.json")) if file_kind(f) == kind] if folder.is_dir() else []
    if not files:
        return None
    return max(files, key=lambda f: (json.loads(f.read_text()).get("date", ""), f.stat().st_mtime))


def _ms(value) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _bench_name(node: str) -> str:
    return node.split("[", 1)[0].removeprefix("bench_")


def _ratio(ratio: float, spread) -> str:
    if isinstance(spread, list) and len(spread) == 2 and spread[0] != spread[1]:
        return f"{ratio:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"
    return f"{ratio:.2f}x"


def _speedups(row: dict) -> str:
    baseline = row.get("baseline", "")
    spreads = row.get("speedup_range", {})
    parts = [f"{name} {_ratio(ratio, spreads.get(name))} vs {baseline}"
             for name, ratio in row.get("speedup_vs_baseline", {}).items()]
    # The benches' extra ratios (speedup_vs_<contender>) are fastmask's time against that contender's.
    parts += [f"fastmask {value:.2f}x vs {key.removeprefix('speedup_vs_')}" for key, value in row.items()
              if key.startswith("speedup_vs_") and key != "speedup_vs_baseline" and isinstance(value, (int, float))]
    return "; ".join(parts)


def _roofline(row: dict) -> str:
    for key in ROOFLINE_KEYS:
        value = row.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.2f}"
        if isinstance(value, dict) and value:
            return "; ".join(f"{name} {v:.2f}" for name, v in value.items())
    return ""


def render(results: dict, source: str) -> str:
    """The markdown block (without the markers) for one results file."""
    if results.get("kind") == "cpu":
        lines = [f"Measured on **{results.get('device', '?')}** (CPU, {results.get('threads', '?')} torch threads) on "
                 f"{results.get('date', '?')}: torch {results.get('torch', '?')}, Python {results.get('python', '?')}. "
                 f"Source: `{source}`. Speedups are medians over interleaved rounds (range in brackets)."]
    else:
        lines = [f"Measured on **{results.get('device', '?')}** (driver {results.get('driver', '?')}) on "
                 f"{results.get('date', '?')}: torch {results.get('torch', '?')}, triton {results.get('triton', '?')}, "
                 f"Python {results.get('python', '?')}. Source: `{source}`."]
    rows = results.get("rows", [])
    for roofline in (r for r in rows if r.get("bench") == "roofline"):
        rates = ", ".join(f"{dtype} {flops / 1e12:.0f} TFLOP/s"
                          for dtype, flops in roofline.get("matmul_flops", {}).items())
        bandwidth = roofline.get("hbm_bytes_per_s", 0) / 1e12
        lines.append(f"Device roofline measured in the same run: HBM {bandwidth:.2f} TB/s; matmul {rates}.")
    return "\n".join(lines + [""] + rows_table(rows, roofline=results.get("kind") != "cpu"))


def rows_table(rows: list[dict], roofline: bool = True) -> list[str]:
    """The markdown table of benchmark rows (the roofline measurement left out), with the roofline
    fraction column where the rows can have one (a GPU's)."""
    lines = ["| benchmark | case | median ms | speedup |" + (" roofline fraction |" if roofline else ""),
             "|---|---|---|---|" + ("---|" if roofline else "")]
    for row in rows:
        if row.get("bench") == "roofline":
            continue
        times = " · ".join(f"{name} {_ms(ms)}" for name, ms in row.get("median_ms", {}).items())
        case = row.get("case", "") + (" (quick)" if row.get("mode") == "quick" else "")
        lines.append(f"| {_bench_name(row.get('bench', ''))} | {case} | {times} | {_speedups(row)} |"
                     + (f" {_roofline(row)} |" if roofline else ""))
    return lines


def _replace_between(text: str, start: str, end: str, block: str) -> str | None:
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    written = []
    for kind, (start, end) in MARKERS.items():
        newest = newest_results(args.results, kind)
        if newest is None:
            continue
        try:
            source = str(newest.relative_to(HERE.parent))
        except ValueError:
            source = newest.name
        replaced = _replace_between(text, start, end, render(json.loads(newest.read_text()), source))
        if replaced is None:
            print(f"bench/table.py: {args.readme} must hold one {start} line before one {end} line", file=sys.stderr)
            return 1
        text = replaced
        written.append(f"{kind} table from {newest}")
    if not written:
        print(f"bench/table.py: no results file in {args.results} yet (run `make bench`). {args.readme} left as it is.")
        return 0
    temporary = args.readme.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(args.readme)
    print(f"bench/table.py: {args.readme}: " + "; ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
