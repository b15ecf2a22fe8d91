"""Regenerate the results table of bench/README.md from the newest bench/results/*.json.

The table goes between the lines ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``;
the rest of the README is left as it is. Without a results file (no GPU has run the suite yet)
the README is not touched. ``make bench`` runs this after the benchmarks.

Usage: python bench/table.py [--results DIR] [--readme FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
ROOFLINE_KEYS = ("roofline_fraction", "fraction_of_hbm")  # measured time's share of the roofline bound


def newest_results(folder: Path) -> Path | None:
    """The results file with the latest date (file modification time breaks ties)."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return None
    return max(files, key=lambda f: (json.loads(f.read_text()).get("date", ""), f.stat().st_mtime))


def _ms(value) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _bench_name(node: str) -> str:
    return node.split("[", 1)[0].removeprefix("bench_")


def _speedups(row: dict) -> str:
    baseline = row.get("baseline", "")
    parts = [f"{name} {ratio:.2f}x vs {baseline}" for name, ratio in row.get("speedup_vs_baseline", {}).items()]
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
    lines = [f"Measured on **{results.get('device', '?')}** (driver {results.get('driver', '?')}) on "
             f"{results.get('date', '?')}: torch {results.get('torch', '?')}, triton {results.get('triton', '?')}, "
             f"Python {results.get('python', '?')}. Source: `{source}`."]
    rows = results.get("rows", [])
    for roofline in (r for r in rows if r.get("bench") == "roofline"):
        rates = ", ".join(f"{dtype} {flops / 1e12:.0f} TFLOP/s"
                          for dtype, flops in roofline.get("matmul_flops", {}).items())
        bandwidth = roofline.get("hbm_bytes_per_s", 0) / 1e12
        lines.append(f"Device roofline measured in the same run: HBM {bandwidth:.2f} TB/s; matmul {rates}.")
    lines += ["", "| benchmark | case | median ms | speedup | roofline fraction |", "|---|---|---|---|---|"]
    for row in rows:
        if row.get("bench") == "roofline":
            continue
        times = " · ".join(f"{name} {_ms(ms)}" for name, ms in row.get("median_ms", {}).items())
        lines.append(f"| {_bench_name(row.get('bench', ''))} | {row.get('case', '')} | {times} | {_speedups(row)} | "
                     f"{_roofline(row)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args(argv)
    newest = newest_results(args.results)
    if newest is None:
        print(f"bench/table.py: no results file in {args.results} yet; timings need a GPU (run `make bench` on a "
              f"CUDA machine). {args.readme} left as it is.")
        return 0
    text = args.readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        print(f"bench/table.py: {args.readme} must hold one {START} line before one {END} line", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    try:
        source = str(newest.relative_to(HERE.parent))
    except ValueError:
        source = newest.name
    block = render(json.loads(newest.read_text()), source)
    temporary = args.readme.with_suffix(".tmp")
    temporary.write_text(f"{head}{START}\n{block}\n{END}{tail}")
    temporary.replace(args.readme)
    print(f"bench/table.py: {args.readme} table regenerated from {newest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
