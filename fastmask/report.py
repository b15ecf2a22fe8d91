"""``report.md`` and its plots, rebuilt from a run folder's ``results.json`` (``fastmask report DIR``).

The report is a header, then one section per finished stage of the registry (``fastmask.stages``:
each stage writes its own section and plots into ``plots/``), then the time of each stage.
Everything is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastmask import io
from fastmask.stages import STAGES, ReportContext


def write_report(folder) -> Path:
    """Rebuild ``report.md`` and the plots of run folder ``folder``; returns the report's path."""
    folder = Path(folder)
    results_file = folder / "results.json"
    if not results_file.exists():
        raise FileNotFoundError(f"{folder} has no results.json: not a fastmask run folder (or nothing finished yet)")
    results = json.loads(results_file.read_text())
    context = ReportContext(folder, folder / "plots", results)
    lines = [f"# fastmask run: {folder.name}", "",
             f"fastmask {results['fastmask_version']} on {results['device']['type']} "
             f"({results['device']['name']}); dataset `{results['config']['data']['name']}`, "
             f"model `{results['config']['model']['name']}`.", ""]
    for stage in STAGES:
        result = results["stages"].get(stage.name)
        if result:  # finished, and not empty (a disabled stage)
            lines += [f"## {stage.title}", ""] + stage.report(result, context)
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["timings"].items()]
    lines.append(f"| total | {sum(results['timings'].values()):.1f} |")
    return io.write_text(folder / "report.md", "\n".join(lines) + "\n")
