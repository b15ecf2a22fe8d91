"""The distill stage: a distilled set of the training data (``fastmask.distill``), saved as
``distilled.safetensors`` with a grid of its images, and the accuracy of networks trained on it alone.

A distilled set is only worth its arm if it beats random real images of the same size: the
same networks (same seeds, same training) are trained on one draw of ``images_per_class`` real
images per class per seed, and the run warns, and the report says so, when the distilled set
does not win.

Result: ``{"method", "images_per_class", "num_images", "syn_test_accuracy", "syn_test_accuracy_std",
"syn_test_accuracies", "random_test_accuracy", "random_test_accuracy_std", "random_test_accuracies",
"beats_random", "margin", "seconds"}`` (``margin``: distilled minus random mean accuracy, in
percentage points; the ``random_*``, ``beats_random`` and ``margin`` are null when ``distill.method``
is ``random``, the baseline itself). Later stages read the set with ``synthetic(ctx)``.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from tqdm.auto import tqdm

from fastmask import distill, distributed
from fastmask.distill import SyntheticSet, random_real
from fastmask.distill.base import stream_seed
from fastmask.stages.base import Context, ReportContext, Stage, one_of, positive

@dataclasses.dataclass
class Config:
    method: str = "dm"  # dm | dsa | dc | idc | mtt | random
    images_per_class: int = 10
    iterations: int = 200
    num_networks: int = 4  # random networks per iteration, run as one stack
    batch_real: int = 256  # real images per class and network in a matching step
    lr: float | None = None  # the synthetic images' learning rate (None: the method's default)
    width: int | None = None  # ConvNet width used while distilling (None: the model's)
    depth: int | None = None  # ConvNet depth used while distilling (None: 3, ConvNet-3)
    eval_seeds: int = 3  # networks trained from scratch on the set to report its accuracy
    mtt_experts: int = 100  # method mtt: expert trajectories trained on real data (kept in experts/)
    mtt_expert_epochs: int = 50  # method mtt: epochs each expert trains

    def __post_init__(self):
        one_of("method", self.method, (*distill.METHODS, "random"))
        positive("images_per_class", self.images_per_class)
        positive("num_networks", self.num_networks)
        positive("batch_real", self.batch_real)
        positive("eval_seeds", self.eval_seeds)
        positive("mtt_experts", self.mtt_experts)
        positive("mtt_expert_epochs", self.mtt_expert_epochs)
        if self.depth is not None:
            positive("depth", self.depth)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def synthetic(ctx: Context) -> SyntheticSet:
    """The distilled set this stage saved (rank 0's copy: the one every rank uses)."""
    return SyntheticSet.load(ctx.path("distilled.safetensors"), device=ctx.device)


def _distill_model_options(cfg) -> dict:
    width = cfg.distill.width or (cfg.model.width if cfg.model.name.startswith("convnet") else None)
    return {name: value for name, value in (("width", width), ("depth", cfg.distill.depth)) if value}


def _method_options(ctx: Context) -> dict:
    """The keyword arguments of ``distill.distill`` that the config sets."""
    cfg = ctx.cfg.distill
    if cfg.method == "random":
        return {}
    options = {"model_options": _distill_model_options(ctx.cfg), "iterations": cfg.iterations,
               "num_networks": cfg.num_networks, "batch_real": cfg.batch_real, "progress": ctx.progress,
               **({} if cfg.lr is None else {"lr": cfg.lr})}
    if cfg.method == "mtt":  # the expert trajectories are kept in the run folder and reused
        options.update(buffer=str(ctx.path("experts", "buffer")), experts=cfg.mtt_experts,
                       expert_train_epochs=cfg.mtt_expert_epochs)
    return options


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    start = time.perf_counter()
    syn = distill.distill(cfg.distill.method, ctx.splits.train, cfg.distill.images_per_class, seed=cfg.seed,
                          **_method_options(ctx))
    seconds = time.perf_counter() - start
    if distributed.is_main():
        syn.save(ctx.path("distilled.safetensors"))
        syn.save_grid(ctx.path("plots", "distilled.png"))
    distributed.barrier()
    syn = synthetic(ctx)  # every rank distilled the same seeded set; rank 0's copy is the one kept
    scores = _evaluate(ctx, syn)
    result = {"method": cfg.distill.method, "images_per_class": cfg.distill.images_per_class,
              "num_images": len(syn), "syn_test_accuracy": scores["mean"], "syn_test_accuracy_std": scores["std"],
              "syn_test_accuracies": scores["accuracies"], **_against_random(ctx, scores), "seconds": seconds}
    if result["beats_random"] is False and distributed.is_main():
        tqdm.write(f"[fastmask] warning: {_loses(result)}", file=sys.stderr)
    return result


def _evaluate(ctx: Context, sets) -> dict:
    """``distill.evaluate`` with the stage's networks, seeds and training (``inner_train``)."""
    cfg = ctx.cfg
    return distill.evaluate(sets, cfg.model.name, ctx.splits.test, seeds=tuple(range(cfg.distill.eval_seeds)),
                            cfg=cfg.inner_train, model_options=ctx.model_options(), progress=ctx.progress)


def random_sets(ctx: Context) -> list[SyntheticSet]:
    """The baseline: per evaluation seed, its own seeded draw of ``images_per_class`` real images per class."""
    cfg = ctx.cfg
    return [random_real(ctx.splits.train, cfg.distill.images_per_class, stream_seed(cfg.seed, f"random real {k}"))
            for k in range(cfg.distill.eval_seeds)]


def _against_random(ctx: Context, scores: dict) -> dict:
    """The random-real baseline's accuracies and whether the distilled set beats it; nulls when the
    set is itself random real images."""
    if ctx.cfg.distill.method == "random":
        return dict.fromkeys(("random_test_accuracy", "random_test_accuracy_std", "random_test_accuracies",
                              "beats_random", "margin"))
    baseline = _evaluate(ctx, random_sets(ctx))
    return {"random_test_accuracy": baseline["mean"], "random_test_accuracy_std": baseline["std"],
            "random_test_accuracies": baseline["accuracies"], "beats_random": scores["mean"] > baseline["mean"],
            "margin": 100 * (scores["mean"] - baseline["mean"])}


def _loses(result: dict) -> str:
    return (f"the distilled set does NOT beat random real images of the same size: "
            f"{100 * result['syn_test_accuracy']:.1f}% vs {100 * result['random_test_accuracy']:.1f}%")


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = []
    if result["method"] == "random":
        lines += ["distill.method is `random`: the set is itself random real images, the baseline; no comparison.", ""]
    elif result.get("beats_random") is False:
        lines += [f"**Warning: {_loses(result)}.** The arms trained on it measure a set no better than random "
                  "real images.", ""]
    elif result.get("beats_random"):  # absent in runs from before the comparison
        lines += [f"The distilled set beats random real images of the same size by {result['margin']:.1f} points "
                  f"({100 * result['syn_test_accuracy']:.1f}% vs {100 * result['random_test_accuracy']:.1f}%).", ""]
    lines += [f"{result['method']}, {result['images_per_class']} images per class ({result['num_images']} images), "
              f"distilled in {result['seconds']:.1f} s (the whole stage, evaluations included: Time per stage). "
              f"Test accuracy of networks trained on a set alone, mean ± std over "
              f"{len(result['syn_test_accuracies'])} seeds:", "", "| set | test accuracy | per seed |", "|---|---|---|"]
    rows = [(f"distilled ({result['method']})", "syn")]
    if result.get("random_test_accuracy") is not None:
        rows.append(("random real images (a draw per seed)", "random"))
    for name, key in rows:
        per_seed = ", ".join(f"{100 * a:.1f}" for a in result[f"{key}_test_accuracies"])
        lines.append(f"| {name} | {100 * result[f'{key}_test_accuracy']:.1f} ± "
                     f"{100 * result[f'{key}_test_accuracy_std']:.1f}% | {per_seed} |")
    lines.append("")
    if (ctx.plots / "distilled.png").exists():
        lines += ["![distilled images](plots/distilled.png)", ""]
    return lines


def summary(result: dict) -> str:
    return (f"{result['method']} set of {result['num_images']} images; networks trained on it alone: "
            f"{100 * result['syn_test_accuracy']:.1f} ± {100 * result.get('syn_test_accuracy_std', 0):.1f}% test accuracy"
            + ("" if result.get("random_test_accuracy") is None else
               f" (random real images of the same size: {100 * result['random_test_accuracy']:.1f}%)"))


STAGE = Stage("distill", "Distilled set", run, report, config=Config, files=("distilled.safetensors", "experts"),
              summary=summary)
