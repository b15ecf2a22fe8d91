"""What the report's plots share: one colour per kind of network, and the atomic PNG writer.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas, never through
``pyplot``, so making a report changes no global matplotlib state of the caller's.

Example::

    figure, axes = plots.figure()
    axes.plot(x, y, color=plots.COLOURS["real"])
    plots.save(figure, folder / "plots" / "curve.png")
"""
from __future__ import annotations

import io as _io
from pathlib import Path

from matplotlib.figure import Figure

from fastmask import io

COLOURS = {"real": "tab:blue", "distilled": "tab:orange", "random": "tab:gray", "dense": "tab:green"}


def figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (6, 4)):
    """A new figure and its axes (one, or an array for several rows or columns)."""
    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, columns)


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return io.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
