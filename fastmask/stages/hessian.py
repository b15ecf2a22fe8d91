"""The hessian stage: the Hutchinson estimate of the Hessian diagonal (``fastmask.hessian``) of the
mean training loss of each analysed network's first LMC copy, over ``hessian.examples`` training
examples; one network per unit of work (``units/hessian/<network>.json``), the diagonal kept as
``checkpoints/hessian_<network>.safetensors``.

Result: per network ``{"trace", "trace_stderr", "diag_mean", "diag_max", "num_probes"}``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from fastmask import distributed, hessian, io, plots
from fastmask.stages import imp, lmc
from fastmask.stages.base import Context, ReportContext, Stage, positive


@dataclasses.dataclass
class Config:
    num_probes: int = 64
    examples: int = 512  # training examples the Hessian's mean loss is taken over
    batch_size: int = 256

    def __post_init__(self):
        if self.num_probes < 2:
            raise ValueError(f"num_probes must be >= 2 (for a standard error), got {self.num_probes}")
        positive("examples", self.examples)
        positive("batch_size", self.batch_size)


def batches_of(ctx: Context) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``hessian.examples`` training examples (all, if fewer) in batches of
    ``hessian.batch_size``: the data of the Hessian's mean loss, here and in the study."""
    cfg = ctx.cfg.hessian
    train = ctx.splits.train
    examples = min(cfg.examples, len(train))
    return [(train.images[i:min(i + cfg.batch_size, examples)], train.labels[i:min(i + cfg.batch_size, examples)])
            for i in range(0, examples, cfg.batch_size)]


def run(ctx: Context) -> dict:
    cfg = ctx.cfg.hessian
    batches = batches_of(ctx)

    def diagonal(kind: str) -> dict:  # a unit of work, on one rank
        model = lmc.trained_pair(ctx, kind)[0]
        result = hessian.hessian_diag(model, F.cross_entropy, batches, num_probes=cfg.num_probes, seed=ctx.cfg.seed,
                                      progress=ctx.progress, description=f"hessian {kind}")
        io.save_tensors(ctx.path("checkpoints", f"hessian_{kind}.safetensors"), dict(result.diag))
        return result.summary()

    return distributed.map_units(imp.NETWORKS, diagonal, ctx.path("units", "hessian"))


def _plot(folder, kinds, plot_folder, subject: str) -> str | None:
    fig, ax = plots.figure()
    drawn = False
    for kind in kinds:
        file = folder / "checkpoints" / f"hessian_{kind}.safetensors"
        if not file.exists():
            continue
        values = torch.cat([t.flatten() for t in io.load_tensors(file).values()])
        values = values[values != 0].abs().clamp_min(1e-12).log10()
        ax.hist(values.numpy(), bins=60, histtype="step", label=plots.LABELS.get(kind, kind),
                color=plots.COLOURS.get(kind), weights=np.full(len(values), 1 / len(values)))
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("log10 |Hessian diagonal entry| (unpruned weights)")
    ax.set_ylabel("fraction of the network's entries per bin")
    ax.set_title(f"Hutchinson estimate of the Hessian diagonal\n{subject}", fontsize=10)
    ax.legend(fontsize=8)
    plots.save(fig, plot_folder / "hessian_diag.png")
    return "hessian_diag.png"


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = ["| network | trace | ± stderr | mean diag | max diag | probes |", "|---|---|---|---|---|---|"]
    for kind, h in result.items():
        lines.append(f"| {kind} | {h['trace']:.4g} | {h['trace_stderr']:.2g} | {h['diag_mean']:.3g} | "
                     f"{h['diag_max']:.3g} | {h['num_probes']} |")
    name = _plot(ctx.folder, result, ctx.plots, ctx.subject())
    return lines + ["", f"![Hessian diagonal]({'plots/' + name})" if name else "", ""]


def summary(result: dict) -> str:
    return "trace " + ", ".join(f"{kind} {h['trace']:.4g} ± {h['trace_stderr']:.2g}" for kind, h in result.items())


STAGE = Stage("hessian", "Hessian diagonal (Hutchinson)", run, report, config=Config, summary=summary)
