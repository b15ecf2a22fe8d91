"""The landscape stage: the loss landscape on the plane through each analysed network's rewind
weights and its two LMC copies (``fastmask.landscape.plane``), one network per unit of work
(``units/landscape/<network>.json``), drawn as ``plots/landscape_<network>.png``.

Result: per network ``{"x", "y", "loss", "error", "points"}`` (``LandscapeResult.to_dict``), or
``{}`` when the stage is disabled.
"""
from __future__ import annotations

import dataclasses

from fastmask import distributed, landscape, masks as masks_module, plots
from fastmask.stages import imp, lmc
from fastmask.stages.base import Context, ReportContext, Stage


@dataclasses.dataclass
class Config:
    enabled: bool = True
    grid: int = 11  # points per axis of the plane through the rewind weights and the two LMC copies


def draw_plane(ctx: Context, model, masks, rewind: dict, pair, data, name: str, of: str, markers: str) -> dict:
    """The plane through ``model`` at its ``rewind`` weights under ``masks`` (in place) and the two
    trained copies ``pair``, on ``data``, drawn as ``plots/<name>.png``; its ``to_dict``."""
    model.load_state_dict(rewind)  # the rewind state holds all-true mask buffers: set the masks after
    start = masks_module.apply(model, masks or {})
    grid = (ctx.cfg.landscape.grid, ctx.cfg.landscape.grid)
    result = landscape.plane(start, *pair, data, grid=grid, progress=ctx.progress)
    result.save_plot(ctx.path("plots", f"{name}.png"),
                     title=f"Test loss on the plane of {of}\n"
                           f"{plots.subject(ctx.folder, ctx.cfg.model.name, ctx.cfg.data.name)}",
                     markers=markers)
    return result.to_dict()


def run(ctx: Context) -> dict:
    if not ctx.cfg.landscape.enabled:
        return {}

    def plane(kind: str) -> dict:  # a unit of work, on one rank
        model, masks, rewind = imp.network(ctx, kind)
        return draw_plane(ctx, model, masks, rewind, lmc.trained_pair(ctx, kind), ctx.splits.test, f"landscape_{kind}",
                          plots.LABELS.get(kind, kind),
                          "w0: the rewind weights (masked); w1, w2: the two copies trained by the lmc stage")

    return distributed.map_units(imp.NETWORKS, plane, ctx.path("units", "landscape"))


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = ["The plane through the rewind weights and the two LMC copies.", ""]
    return lines + [f"![landscape {k}](plots/landscape_{k}.png)" for k in result] + [""]


def summary(result: dict) -> str:
    def lowest(loss):  # NaN where a grid point diverged
        return min((v for row in loss for v in row if v == v), default=float("nan"))

    return "lowest test loss on the plane " + ", ".join(f"{kind} {lowest(r['loss']):.3g}" for kind, r in result.items())


STAGE = Stage("landscape", "Loss landscape", run, report, config=Config, summary=summary)
