"""The landscape stage: the loss landscape on the plane through each analysed network's rewind
weights and its two LMC copies (``fastmask.landscape.plane``), one network per unit of work
(``units/landscape/<network>.json``); the report draws each as ``plots/landscape_<network>.png``
(as it draws LMC's, IMP's and the Hessian's figures: the stage's time is the computation's).

Result: per network ``{"x", "y", "loss", "error", "points", "xlabel", "ylabel"}``
(``LandscapeResult.to_dict``), or ``{}`` when the stage is disabled.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fastmask import distributed, landscape, masks as masks_module, plots
from fastmask.stages import imp, lmc
from fastmask.stages.base import Context, ReportContext, Stage

MARKERS = "w0: the rewind weights (masked); w1, w2: the two copies trained by the lmc stage"


@dataclasses.dataclass
class Config:
    enabled: bool = True
    grid: int = 11  # points per axis of the plane through the rewind weights and the two LMC copies


def measure_plane(ctx: Context, model, masks, rewind: dict, pair, data) -> dict:
    """The plane through ``model`` at its ``rewind`` weights under ``masks`` (in place) and the two
    trained copies ``pair``, on ``data``: its ``to_dict``."""
    model.load_state_dict(rewind)  # the rewind state holds all-true mask buffers: set the masks after
    start = masks_module.apply(model, masks or {})
    grid = (ctx.cfg.landscape.grid, ctx.cfg.landscape.grid)
    return landscape.plane(start, *pair, data, grid=grid, progress=ctx.progress).to_dict()


def draw_plane(entry: dict, path: Path, of: str, subject: str, markers: str) -> Path:
    """The plane ``entry`` (``measure_plane``'s) drawn as ``path``, titled with what it is ``of``
    (an entry stored before results kept the axes' labels gets ``landscape.plane``'s)."""
    labelled = {"xlabel": landscape.PLANE_XLABEL, "ylabel": landscape.PLANE_YLABEL, **entry}
    return landscape.LandscapeResult.from_dict(labelled).save_plot(
        path, title=f"Test loss on the plane of {of}\n{subject}", markers=markers)


def run(ctx: Context) -> dict:
    if not ctx.cfg.landscape.enabled:
        return {}

    def plane(kind: str) -> dict:  # a unit of work, on one rank
        model, masks, rewind = imp.network(ctx, kind)
        return measure_plane(ctx, model, masks, rewind, lmc.trained_pair(ctx, kind), ctx.splits.test)

    return distributed.map_units(imp.NETWORKS, plane, ctx.path("units", "landscape"))


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = ["The plane through the rewind weights and the two LMC copies.", ""]
    for kind, entry in result.items():
        path = draw_plane(entry, ctx.plots / f"landscape_{kind}.png", plots.LABELS.get(kind, kind), ctx.subject(),
                          MARKERS)
        lines.append(f"![landscape {kind}](plots/{path.name})")
    return lines + [""]


def summary(result: dict) -> str:
    def lowest(loss):  # NaN where a grid point diverged
        return min((v for row in loss for v in row if v == v), default=float("nan"))

    return "lowest test loss on the plane " + ", ".join(f"{kind} {lowest(r['loss']):.3g}" for kind, r in result.items())


STAGE = Stage("landscape", "Loss landscape", run, report, config=Config, summary=summary)
