"""The distill stage: a distilled set of the training data (``fastmask.distill``), saved as
``distilled.safetensors`` with a grid of its images, and the accuracy of networks trained on it alone.

Result: ``{"method", "images_per_class", "num_images", "syn_test_accuracy", "syn_test_accuracy_std",
"syn_test_accuracies", "seconds"}``. Later stages read the set with ``synthetic(ctx)``.
"""
from __future__ import annotations

import dataclasses
import time

from fastmask import distill, distributed
from fastmask.distill import SyntheticSet
from fastmask.stages.base import Context, ReportContext, Stage, one_of, positive

@dataclasses.dataclass
class Config:
    method: str = "dm"  # dm | dsa | dc | idc | mtt | random
    images_per_class: int = 10
    iterations: int = 200
    num_networks: int = 4  # random networks per iteration, run as one stack
    batch_real: int = 256  # real images per class and network in a matching step
    width: int | None = None  # ConvNet width used while distilling (None: the model's)
    depth: int | None = None  # ConvNet depth used while distilling (None: 3, ConvNet-3)
    eval_seeds: int = 3  # networks trained from scratch on the set to report its accuracy

    def __post_init__(self):
        one_of("method", self.method, (*distill.METHODS, "random"))
        positive("images_per_class", self.images_per_class)
        positive("num_networks", self.num_networks)
        positive("batch_real", self.batch_real)
        positive("eval_seeds", self.eval_seeds)
        if self.depth is not None:
            positive("depth", self.depth)


def synthetic(ctx: Context) -> SyntheticSet:
    """The distilled set this stage saved (rank 0's copy: the one every rank uses)."""
    return SyntheticSet.load(ctx.path("distilled.safetensors"), device=ctx.device)


def _distill_model_options(cfg) -> dict:
    width = cfg.distill.width or (cfg.model.width if cfg.model.name.startswith("convnet") else None)
    return {name: value for name, value in (("width", width), ("depth", cfg.distill.depth)) if value}


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    start = time.perf_counter()
    method_options = {} if cfg.distill.method == "random" else {
        "model_options": _distill_model_options(cfg), "iterations": cfg.distill.iterations,
        "num_networks": cfg.distill.num_networks, "batch_real": cfg.distill.batch_real, "progress": ctx.progress}
    if cfg.distill.method == "mtt":  # the expert trajectories are kept in the run folder and reused
        method_options["buffer"] = str(ctx.path("experts", "buffer"))
    syn = distill.distill(cfg.distill.method, ctx.splits.train, cfg.distill.images_per_class, seed=cfg.seed,
                          **method_options)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        syn.save(ctx.path("distilled.safetensors"))
        syn.save_grid(ctx.path("plots", "distilled.png"))
    distributed.barrier()
    syn = synthetic(ctx)  # every rank distilled the same seeded set; rank 0's copy is the one kept
    scores = distill.evaluate(syn, cfg.model.name, ctx.splits.test, seeds=tuple(range(cfg.distill.eval_seeds)),
                              cfg=cfg.inner_train, model_options=ctx.model_options(), progress=ctx.progress)
    return {"method": cfg.distill.method, "images_per_class": cfg.distill.images_per_class,
            "num_images": len(syn), "syn_test_accuracy": scores["mean"], "syn_test_accuracy_std": scores["std"],
            "syn_test_accuracies": scores["accuracies"], "seconds": seconds}


def report(result: dict, ctx: ReportContext) -> list[str]:
    lines = [f"{result['method']}, {result['images_per_class']} images per class ({result['num_images']} images), "
             f"distilled in {result['seconds']:.1f} s (the whole stage, with the evaluation: Time per stage). Networks trained on it alone: test accuracy "
             f"{100 * result['syn_test_accuracy']:.1f} ± {100 * result.get('syn_test_accuracy_std', 0):.1f}%.", ""]
    if (ctx.plots / "distilled.png").exists():
        lines += ["![distilled images](plots/distilled.png)", ""]
    return lines


def summary(result: dict) -> str:
    return (f"{result['method']} set of {result['num_images']} images; networks trained on it alone: "
            f"{100 * result['syn_test_accuracy']:.1f} ± {100 * result.get('syn_test_accuracy_std', 0):.1f}% test accuracy")


STAGE = Stage("distill", "Distilled set", run, report, config=Config, files=("distilled.safetensors", "experts"),
              summary=summary)
