"""The lmc stage: instability to SGD noise (``fastmask.lmc.instability``) of each analysed network
(``stages.imp.NETWORKS``): two copies trained on the real data with different data orders, then
interpolated on the train and the test data (and with BatchNorm statistics recomputed, for models
with BatchNorm). One network is a unit of work (``units/lmc/<network>.json``); the trained copies
are kept as ``checkpoints/lmc_<network>_{a,b}.safetensors`` for the later stages
(``trained_pair(ctx, kind)``).

Result: per network ``{"alphas", "test_loss", "test_error", "barrier_loss", "barrier_error",
"train_loss", "train_error", "train_barrier_loss", "train_barrier_error", "density"}`` and, with
a BatchNorm reset, ``"bn_reset": {"test_loss", "test_error", "barrier_loss", "barrier_error"}``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastmask import distributed, io, lmc, masks as masks_module, plots
from fastmask.stages import imp
from fastmask.stages.base import Context, ReportContext, Stage


@dataclasses.dataclass
class Config:
    alphas: int = 30
    seeds: tuple[int, int] = (1, 2)  # the two copies' data orders
    bn_reset: bool = True  # also report BatchNorm-reset (REPAIR) curves when the model has BatchNorm

    def __post_init__(self):
        if self.alphas < 2:
            raise ValueError(f"alphas must be >= 2 (the endpoints), got {self.alphas}")


def trained_pair(ctx: Context, kind: str) -> list[nn.Module]:
    """The two trained copies of analysed network ``kind``."""
    pair = []
    for name in "ab":
        model = ctx.build_model()
        model.load_state_dict(io.load_tensors(ctx.path("checkpoints", f"lmc_{kind}_{name}.safetensors"), ctx.device))
        pair.append(model)
    return pair


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in ctx.build_model().modules())

    def analyse(kind: str) -> dict:  # a unit of work: one rank trains and interpolates the pair alone
        model, masks, rewind = imp.network(ctx, kind)
        result = lmc.instability(model, masks, rewind, ctx.splits, cfg.train, seeds=cfg.lmc.seeds, alphas=cfg.lmc.alphas,
                                 bn_reset=cfg.lmc.bn_reset and has_batch_norm, progress=ctx.progress,
                                 description=f"instability {kind}")
        for name, trained in zip("ab", result.models):
            io.save_tensors(ctx.path("checkpoints", f"lmc_{kind}_{name}.safetensors"), trained.state_dict())
        entry = {"alphas": result.test.alphas, "test_loss": result.test.loss, "test_error": result.test.error,
                 "barrier_loss": result.test.barrier_loss, "barrier_error": result.test.barrier_error,
                 "train_loss": result.train.loss, "train_error": result.train.error,
                 "train_barrier_loss": result.train.barrier_loss, "train_barrier_error": result.train.barrier_error,
                 "density": masks_module.density(masks or {})}
        if result.test_reset is not None:
            entry["bn_reset"] = {"test_loss": result.test_reset.loss, "test_error": result.test_reset.error,
                                 "barrier_loss": result.test_reset.barrier_loss,
                                 "barrier_error": result.test_reset.barrier_error}
        return entry

    out = distributed.map_units(imp.NETWORKS, analyse, ctx.path("units", "lmc"))
    for kind, entry in out.items():
        ctx.log({"stage": "lmc", "network": kind, "barrier_error": entry["barrier_error"]})
    return out


def _plots(result: dict, folder, subject: str) -> list[str]:
    names = []
    for kind, entry in result.items():
        fig, axes = plots.figure(1, 2, size=(10, 4))
        for ax, quantity, scale, unit in zip(axes, ("error", "loss"), (100, 1), (" (%)", "")):
            for split, style in (("train", "--"), ("test", "-")):
                ax.plot(entry["alphas"], [scale * v for v in entry[f"{split}_{quantity}"]], style, marker=".",
                        label=f"{split} data", color=plots.COLOURS.get(kind))
            if "bn_reset" in entry:
                ax.plot(entry["alphas"], [scale * v for v in entry["bn_reset"][f"test_{quantity}"]], ":",
                        label="test data, BatchNorm statistics recomputed", color="black")
            ax.set_xlabel("alpha: (1 - alpha) copy a + alpha copy b")
            ax.set_ylabel(f"{quantity}{unit}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Linear interpolation between two trained copies: {plots.LABELS.get(kind, kind)}, density "
                     f"{entry['density']:.3f}\ntest barrier {100 * entry['barrier_error']:.2f}% error, "
                     f"{entry['barrier_loss']:.3f} loss; {subject}", fontsize=10)
        name = f"lmc_{kind}.png"
        plots.save(fig, folder / name)
        names.append(name)
    return names


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = ["| network | density | test error barrier | test loss barrier | train error barrier |",
             "|---|---|---|---|---|"]
    for kind, entry in result.items():
        lines.append(f"| {kind} | {entry['density']:.4f} | {100 * entry['barrier_error']:.2f}% | "
                     f"{entry['barrier_loss']:.4f} | {100 * entry['train_barrier_error']:.2f}% |")
    return lines + [""] + [f"![{n}](plots/{n})" for n in _plots(result, ctx.plots, ctx.subject())] + [""]


def summary(result: dict) -> str:
    return "test error barrier " + ", ".join(f"{kind} {100 * e['barrier_error']:.2f}%" for kind, e in result.items())


STAGE = Stage("lmc", "Linear mode connectivity", run, report, config=Config, summary=summary)
