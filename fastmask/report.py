"""``report.md`` and its plots, rebuilt from a run folder's ``results.json`` (``fastmask report DIR``).

The report is a header (device, dataset and its sizes, model), then one section per finished stage
of the registry (``fastmask.stages``: each stage writes its own section and plots into ``plots/``),
then the time of each stage, as measured by the pipeline around the whole stage. Everything is
written atomically.

Example::

    from fastmask import report
    print(report.write_report("runs/demo").read_text())
"""
from __future__ import annotations

import json
from pathlib import Path

from fastmask import io
from fastmask.stages import STAGES, ReportContext

REQUIRED_KEYS = ("fastmask_version", "config", "device", "stages", "timings", "completed")


def load_results(folder) -> dict:
    """The ``results.json`` of run folder ``folder``, checked: a missing file, a file that is not
    JSON or one without the schema's keys (docs/design.md) is an error naming the file."""
    path = Path(folder) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{Path(folder)} has no results.json: not a fastmask run folder (or nothing finished "
                                "yet)")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun with --force to start over") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(results, dict) or key not in results]
    if missing:
        raise ValueError(f"{path} is not a fastmask results file (missing {', '.join(missing)}); rerun with --force "
                         "to start over")
    return results


def _header(folder: Path, results: dict) -> list[str]:
    data, sizes = results["config"]["data"], results.get("data")
    counted = f" ({sizes['train_size']:,} training, {sizes['test_size']:,} test images)" if sizes else ""
    test_set = f"the {sizes['test_size']:,} test images" if sizes else "the whole test set"
    return [f"# fastmask run: {folder.name}", "",
            f"fastmask {results['fastmask_version']} on {results['device']['type']} ({results['device']['name']}); "
            f"dataset `{data['name']}`{counted}, model `{results['config']['model']['name']}`. Test accuracies and "
            f"errors are over {test_set}.", ""]


def write_report(folder) -> Path:
    """Rebuild ``report.md`` and the plots of run folder ``folder``; returns the report's path."""
    folder = Path(folder)
    results = load_results(folder)
    context = ReportContext(folder, folder / "plots", results)
    lines = _header(folder, results)
    for stage in STAGES:
        result = results["stages"].get(stage.name)
        if result:  # finished, and not empty (a disabled stage)
            lines += [f"## {stage.title}", ""] + stage.report(result, context)
    lines += ["## Time per stage", "", "Wall time of each whole stage (its training, evaluation and files).", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["timings"].items()]
    lines.append(f"| total | {sum(results['timings'].values()):.1f} |")
    return io.write_text(folder / "report.md", "\n".join(lines) + "\n")
