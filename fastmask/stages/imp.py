"""The imp stage: iterative magnitude pruning with the real and with the distilled data in the
inner loop, every round's mask retrained on the real data, and a random-pruning baseline at the
same densities.

This module is IMP's runner (open_lth's split; ``fastmask.prune.IMP`` is the strategy):
``run_in_folder`` keeps each finished round's mask, the rewind weights and the state of the run in
a folder, resumes from them, and spreads the retraining of the masks over torchrun's ranks
(``fastmask.distributed.map_unit_groups``: ``<folder>/retrain/<mask>.json``); only the writing
rank writes. Files: ``imp_real/``, ``imp_distilled/`` (``rewind.safetensors``,
``mask_round<r>.safetensors``, ``imp_state.json``, ``retrain/``) and ``imp_random/retrain/``.

Result: ``{"real": [round], "distilled": [round], "random": [round]}`` with rounds
``{"round", "density", "test_accuracy", "train_points_used"}`` (IMP's also ``"inner"``). Later
stages take the analysed networks (``NETWORKS``: the dense network and the last mask of each IMP
run) with ``network(ctx, kind)``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from fastmask import distributed, io, masks as masks_module, plots, prune
from fastmask.data import DataSplits
from fastmask.stages import dense, distill
from fastmask.stages.base import Context, ReportContext, Stage, one_of, positive
from fastmask.train import TrainConfig

INNER = ("real", "distilled")  # the IMP runs of the stage, by inner-loop data
NETWORKS = ("dense", "real", "distilled")  # the networks later stages analyse


@dataclasses.dataclass
class Config:
    rounds: int = 5
    rate: float = 0.2
    rewind_step: int = 0
    scope: str = "global"  # global | layer
    random_baseline: bool = True  # random (layer-wise) masks at the same densities, retrained
    retrain_stack: int = 4  # masks retrained at once as one stack

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must lie in (0, 1), got {self.rate}")
        one_of("scope", self.scope, ("global", "layer"))
        positive("retrain_stack", self.retrain_stack)
        if self.rounds < 0 or self.rewind_step < 0:
            raise ValueError("rounds and rewind_step must be >= 0")


def retrain_in_folder(model: nn.Module, rewind: dict[str, Tensor], masks: Sequence[dict[str, Tensor]],
                      data: DataSplits, cfg: TrainConfig, seed: int, chunk: int, folder: Path,
                      known: dict[int, float] | None = None, progress: bool = True) -> list[float]:
    """``prune.retrain_masks`` as units of work: ``chunk`` masks at a time as one stack, the groups
    dealt out over the ranks, each accuracy kept in ``folder/<mask index>.json`` as it is found; a
    rerun skips those masks."""
    def train(group: list[int]) -> list[float]:
        return prune.retrain(model, rewind, [masks[r] for r in group], data, cfg, seed, progress,
                             f"retrain masks {group}")

    accuracies = distributed.map_unit_groups(range(len(masks)), train, folder, group=max(1, chunk), known=known)
    return [accuracies[r] for r in range(len(masks))]


def run_in_folder(strategy: prune.IMP, folder: str | Path, retrain_stack: int = 4,
                  retrain: bool = True) -> prune.IMPResult:
    """``prune.imp`` with its files in ``folder``: every finished round's mask and the run's state
    are saved as they are found, and a rerun resumes where the last one stopped. Under torchrun call
    it on every rank: the rounds train data parallel, rank 0's rewind weights and masks are the
    ones every rank uses, and the retraining of the masks is dealt out over the ranks. Without
    ``retrain`` (a caller that retrains the masks itself, as the study stage does) the masks are
    not retrained: a test accuracy the rounds did not give is None."""
    folder = Path(folder)
    state_file = folder / "imp_state.json"
    # Rank 0's view of the folder decides where every rank resumes (see fastmask.distributed).
    state = distributed.main_only(lambda: json.loads(state_file.read_text()) if state_file.exists()
                                  else {"found": 0, "points": [strategy.pretrain_points]})
    rewind_file = folder / "rewind.safetensors"
    if distributed.broadcast_object(rewind_file.exists()):
        rewind = io.load_tensors(rewind_file, strategy.device)
    else:
        rewind = strategy.rewind_weights()
        distributed.broadcast_tensors(rewind)  # rank 0's copy is the one saved: every rank uses it
        if distributed.is_writer():
            io.save_tensors(rewind_file, rewind)
    masks = [strategy.dense_mask()] + [io.load_tensors(folder / f"mask_round{r}.safetensors", strategy.device)
                                       for r in range(1, state["found"] + 1)]
    retrain_folder = folder / "retrain"
    retrained = {}  # mask index -> test accuracy, for the masks the real inner loop retrains
    for found in strategy.rounds(rewind, masks[-1], start=state["found"]):
        if found.test_accuracy is not None:  # this round's training was the retraining of the mask before
            retrained[found.index - 1] = found.test_accuracy
            if distributed.is_writer():
                distributed.save_unit(retrain_folder, found.index - 1, found.test_accuracy)
        distributed.broadcast_tensors(found.mask)  # rank 0's mask is the one saved: every rank uses it
        masks.append(found.mask)
        state["points"].append(state["points"][-1] + found.examples_seen)
        state["found"] = found.index
        if distributed.is_writer():
            io.save_tensors(folder / f"mask_round{found.index}.safetensors", found.mask)
            io.write_json(state_file, state)
    if not retrain:
        return prune.IMPResult(strategy.records(masks, [retrained.get(r) for r in range(len(masks))],
                                                state["points"]), masks, rewind)
    accuracies = retrain_in_folder(strategy.model, rewind, masks, strategy.data, strategy.retrain_cfg, strategy.seed,
                                   retrain_stack, retrain_folder, retrained, strategy.progress)
    return prune.IMPResult(strategy.records(masks, accuracies, state["points"]), masks, rewind)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    model = ctx.build_model()
    out = {}
    for inner in INNER:
        strategy = prune.IMP(model, ctx.splits, cfg.imp.rounds, cfg.imp.rate, cfg.imp.rewind_step, inner,
                             distilled=distill.synthetic(ctx) if inner == "distilled" else None, scope=cfg.imp.scope,
                             inner_cfg=cfg.inner_train, retrain_cfg=cfg.train, seed=cfg.seed, progress=ctx.progress)
        result = run_in_folder(strategy, ctx.path(f"imp_{inner}"), cfg.imp.retrain_stack)
        out[inner] = result.rounds
        ctx.log({"stage": "imp", "inner": inner, "rounds": result.rounds})
    if cfg.imp.random_baseline:
        rewind = io.load_tensors(ctx.path("imp_real", "rewind.safetensors"), ctx.device)
        densities = [r["density"] for r in out["real"]]
        masks = [prune.random_masks(model, d, "layer", seed=cfg.seed + i) for i, d in enumerate(densities)]
        accuracies = retrain_in_folder(model, rewind, masks, ctx.splits, cfg.train, cfg.seed, cfg.imp.retrain_stack,
                                       ctx.path("imp_random", "retrain"), progress=ctx.progress)
        out["random"] = [{"round": i, "density": masks_module.density(m), "test_accuracy": a, "train_points_used": 0}
                         for i, (m, a) in enumerate(zip(masks, accuracies))]
    return out


def network(ctx: Context, kind: str):
    """(model, masks, rewind weights) of an analysed network: ``"dense"`` (no masks, the dense
    initialisation), or the last mask of the ``"real"`` / ``"distilled"`` IMP run (None at round 0)."""
    model = ctx.build_model()
    if kind == "dense":
        return model, None, dense.init_weights(ctx)
    folder = ctx.path(f"imp_{kind}")
    last = ctx.results["stages"]["imp"][kind][-1]["round"]
    masks = io.load_tensors(folder / f"mask_round{last}.safetensors", ctx.device) if last else None
    return model, masks, io.load_tensors(folder / "rewind.safetensors", ctx.device)


def _plots(imp: dict, dense_result: dict | None, folder: Path, subject: str) -> list[str]:
    fig, ax = plots.figure()
    for kind, rounds in imp.items():
        ax.plot([r["density"] for r in rounds], [100 * r["test_accuracy"] for r in rounds], "o-",
                label=plots.LABELS.get(kind, kind), color=plots.COLOURS.get(kind))
    if dense_result:
        ax.axhline(100 * dense_result["test_accuracy"], color=plots.COLOURS["dense"], ls="--",
                   label=plots.LABELS["dense"])
    densities = [r["density"] for r in imp["real"]]
    ax.set_xscale("log")
    ax.set_xticks(densities, [f"{d:.3g}" for d in densities])  # one tick per round's density
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("density (fraction of weights kept; one point per IMP round)")
    ax.set_ylabel("test accuracy after retraining (%)")
    ax.set_title(f"Accuracy of the retrained masks\n{subject}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save(fig, folder / "accuracy_vs_density.png")

    fig, ax = plots.figure()
    for kind in INNER:
        if kind in imp:
            ax.plot([r["round"] for r in imp[kind]], [r["train_points_used"] for r in imp[kind]], "o-",
                    label=plots.LABELS[kind], color=plots.COLOURS[kind])
    ax.set_xticks([r["round"] for r in imp["real"]])
    ax.set_xlabel("IMP round (0: the dense network)")
    ax.set_ylabel("training examples seen, cumulative")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.set_title(f"Training examples spent to find each mask\n{subject}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save(fig, folder / "train_points.png")
    return ["accuracy_vs_density.png", "train_points.png"]


def report(result: dict, ctx: ReportContext) -> list[str]:
    names = _plots(result, ctx.results["stages"].get("dense"), ctx.plots, ctx.subject())
    lines = ["| round | density | " + " | ".join(f"{k} accuracy" for k in result) + " | real points | distilled points |",
             "|---|---|" + "---|" * len(result) + "---|---|"]
    for i, record in enumerate(result["real"]):
        accuracies = " | ".join(f"{100 * result[k][i]['test_accuracy']:.2f}%" if i < len(result[k]) else ""
                                for k in result)
        points = [result[k][i]["train_points_used"] if k in result and i < len(result[k]) else "" for k in INNER]
        lines.append(f"| {i} | {record['density']:.4f} | {accuracies} | {points[0]} | {points[1]} |")
    return lines + [""] + [f"![{n}](plots/{n})" for n in names] + [""]


def summary(result: dict) -> str:
    last = {kind: rounds[-1] for kind, rounds in result.items()}
    accuracies = ", ".join(f"{kind} {100 * r['test_accuracy']:.1f}%" for kind, r in last.items())
    return f"at density {last['real']['density']:.3f}: {accuracies}"


STAGE = Stage("imp", "Iterative magnitude pruning", run, report, config=Config,
              files=("imp_real", "imp_distilled", "imp_random"), summary=summary)
