"""What the report's plots share: one colour and one name per kind of network, the words that
name the run in every title, and the atomic PNG writer.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas, never through
``pyplot``, so making a report changes no global matplotlib state of the caller's.

Example::

    figure, axes = plots.figure()
    axes.plot(x, y, color=plots.COLOURS["real"], label=plots.LABELS["real"])
    axes.set_title(f"test accuracy\n{plots.subject(folder, 'convnet3', 'digits')}")
    plots.save(figure, folder / "plots" / "curve.png")
"""
from __future__ import annotations

import io as _io
from pathlib import Path

from matplotlib.figure import Figure

from fastmask import io

COLOURS = {"real": "tab:blue", "distilled": "tab:orange", "random": "tab:gray", "dense": "tab:green"}
# The legend's words for each kind of network (the report's tables use the short keys).
LABELS = {"real": "IMP, real data in the inner loop", "distilled": "IMP, distilled data in the inner loop",
          "random": "random pruning", "dense": "dense (unpruned)"}


def subject(folder, model: str, dataset: str) -> str:
    """The words every plot's title ends with: which network, on which data, in which run folder."""
    return f"{model} on {dataset}, run {Path(folder).name}"


def figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (6, 4)):
    """A new figure and its axes (one, or an array for several rows or columns)."""
    fig = Figure(figsize=size, layout="constrained")  # labels, titles and legends never overlap
    return fig, fig.subplots(rows, columns)


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return io.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
