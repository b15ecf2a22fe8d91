"""``run_reference(cfg, out_dir)``: fastmask's pipeline (``fastmask.pipeline``) written in plain,
eager PyTorch, stage for stage with the same hyperparameters, and the same ``results.json`` schema.

    distill    DM, one network and one class at a time (or "random": random real images); the
               set's accuracy from fresh networks trained on it one after another, and theirs on
               random real images (a draw per network) when the set is distilled
    dense      the dense network trained on the real data
    imp        IMP with the real and the distilled inner loop, and the random-pruning baseline:
               torch.nn.utils.prune masks, one training run at a time
    lmc        two copies of each analysed network (dense, last real / distilled mask) trained one
               after the other; one alpha at a time on the train and test sets (and after a
               BatchNorm reset, for models with BatchNorm)
    landscape  the plane through the rewind weights and the two copies, one grid point at a time
    hessian    Hutchinson, one probe at a time (PyHessian)
    study      every density of the arms real, distilled, hybrid (its own IMP) and random, 2 * seeds
               copies each trained one after another: accuracy, barriers, Hessian trace, per-example
               LMC, planes of the hybrid and random arms (``bench.reference.study``); the Data Diet
               arms (subset, easy) are not written: refused when the run starts

Only the data (``fastmask.data.load``, so that both pipelines see the same tensors), the
configuration (``fastmask.config``) and the study's judging of the papers' claims
(``fastmask.study.claims``, from the reference's numbers) come from fastmask; the models,
training, pruning and every measurement are the reference's own. Nothing is resumed: a run is
one pass, timed per stage.

Example::

    from fastmask.config import load_config
    results = run_reference(load_config("synthetic-convnet3"), "runs/reference")
    results["timings"], results["stages"]["dense"]["test_accuracy"]
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fastmask
from fastmask import data as fastmask_data
from fastmask.config import PipelineConfig, to_dict
from fastmask.pipeline import device_name, resolve_device  # the same device handling as fastmask

from bench.reference import distill, hessian, landscape, lmc, models, prune, study
from bench.reference.data import eval_loader
from bench.reference.train import train

STAGES = ("distill", "dense", "imp", "lmc", "landscape", "hessian", "study")
NETWORKS = ("dense", "real", "distilled")
EVAL_BATCH = 1024  # fastmask.lmc's default batch for evaluations


class _Reference:
    """One run's data, options and the objects stages hand to each other."""

    def __init__(self, cfg: PipelineConfig, device: torch.device, num_workers: int, compile: bool, quiet: bool):
        if cfg.distill.method not in ("dm", "random"):
            raise ValueError(f"distill.method must be 'dm' or 'random' in the reference pipeline, "
                             f"got {cfg.distill.method!r}")
        study.check_arms(cfg.study.arms)
        self.cfg, self.device, self.quiet = cfg, device, quiet
        self.train_options = dict(device=device, num_workers=num_workers, compile=compile)
        options = {}
        if cfg.data.name == "synthetic":
            options = {"train_size": cfg.data.train_size, "test_size": cfg.data.test_size}
        splits = fastmask_data.load(cfg.data.name, cfg.data.root, device="cpu", zca=cfg.data.zca, seed=cfg.seed,
                                    **options)
        self.train_data = (splits.train.images, splits.train.labels)
        self.test_data = (splits.test.images, splits.test.labels)
        self.num_classes, self.shape = splits.train.num_classes, splits.train.image_shape
        pin = device.type == "cuda"
        self.test_loader = eval_loader(*self.test_data, EVAL_BATCH, pin_memory=pin)
        self.train_eval_loader = eval_loader(*self.train_data, EVAL_BATCH, pin_memory=pin)
        self.synthetic = None  # (images, labels) from the distill stage
        self.imp = {}  # inner -> IMPOutcome
        self.pairs = {}  # network -> (model_a, model_b) trained by the lmc stage

    def say(self, text: str):
        if not self.quiet:
            print(f"[reference] {text}", flush=True)

    def model_options(self) -> dict:
        return {k: v for k, v in (("width", self.cfg.model.width), ("norm", self.cfg.model.norm)) if v is not None}

    def build(self) -> nn.Module:
        """The configured model, initialised from ``cfg.seed`` (the weights fastmask starts from)."""
        torch.manual_seed(self.cfg.seed)
        return models.create(self.cfg.model.name, self.num_classes, self.shape, **self.model_options()).to(self.device)

    def network(self, kind: str):
        """(template, masks, rewind state) of an analysed network."""
        template = self.build()
        if kind == "dense":
            return template, None, {k: v.clone() for k, v in template.state_dict().items()}
        outcome = self.imp[kind]
        masks = outcome.masks[-1] if len(outcome.masks) > 1 else None
        return template, masks, outcome.rewind

    # ----------------------------------------------------------------------------- stages

    def stage_distill(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        images, labels = self.train_data
        if cfg.distill.method == "random":
            index = distill.random_real(labels, self.num_classes, cfg.distill.images_per_class,
                                        torch.Generator().manual_seed(cfg.seed))
            self.synthetic = (images[index].clone(), labels[index].clone())
        else:
            # The random networks are ConvNet-3 (the papers'), as wide as the model if it is a ConvNet.
            width = cfg.distill.width or (cfg.model.width if cfg.model.name.startswith("convnet") else None)
            options = {"width": width} if width else {}

            def random_network() -> nn.Module:
                return models.create("convnet3", self.num_classes, self.shape, **options)

            self.synthetic = distill.distribution_matching(
                images, labels, self.num_classes, cfg.distill.images_per_class, iterations=cfg.distill.iterations,
                num_networks=cfg.distill.num_networks, build=random_network, seed=cfg.seed, device=self.device)
        _synchronize(self.device)
        seconds = time.perf_counter() - start
        seeds = range(cfg.distill.eval_seeds)
        accuracies = [self.accuracy_of(self.synthetic, seed) for seed in seeds]
        baseline = dict.fromkeys(("random_test_accuracy", "random_test_accuracy_std", "random_test_accuracies",
                                  "beats_random", "margin"))
        if cfg.distill.method != "random":  # one draw of random real images per evaluation seed
            draws = [distill.random_real(labels, self.num_classes, cfg.distill.images_per_class,
                                         torch.Generator().manual_seed(cfg.seed + 1 + seed)) for seed in seeds]
            random_accuracies = [self.accuracy_of((images[index], labels[index]), seed)
                                 for index, seed in zip(draws, seeds)]
            baseline = {"random_test_accuracy": float(np.mean(random_accuracies)),
                        "random_test_accuracy_std": float(np.std(random_accuracies)),
                        "random_test_accuracies": random_accuracies,
                        "beats_random": bool(np.mean(accuracies) > np.mean(random_accuracies)),
                        "margin": float(100 * (np.mean(accuracies) - np.mean(random_accuracies)))}
        return {"method": cfg.distill.method, "images_per_class": cfg.distill.images_per_class,
                "num_images": len(self.synthetic[0]), "syn_test_accuracy": float(np.mean(accuracies)),
                "syn_test_accuracy_std": float(np.std(accuracies)), "syn_test_accuracies": accuracies, **baseline,
                "seconds": seconds}

    def accuracy_of(self, train_set: tuple[torch.Tensor, torch.Tensor], seed: int) -> float:
        """The test accuracy of a fresh network (seed ``seed``) trained on ``train_set`` alone."""
        torch.manual_seed(seed)
        net = models.create(self.cfg.model.name, self.num_classes, self.shape, **self.model_options()).to(self.device)
        return train(net, *train_set, self.cfg.inner_train, seed, test=self.test_data, **self.train_options).test_accuracy

    def stage_dense(self) -> dict:
        start = time.perf_counter()
        outcome = train(self.build(), *self.train_data, self.cfg.train, self.cfg.seed, test=self.test_data,
                        **self.train_options)
        return {"test_accuracy": outcome.test_accuracy, "test_loss": outcome.test_loss, "steps": outcome.steps,
                "seconds": time.perf_counter() - start}

    def stage_imp(self) -> dict:
        cfg = self.cfg
        data = {"train": self.train_data, "test": self.test_data, "distilled": self.synthetic}
        out = {}
        for inner in ("real", "distilled"):
            self.say(f"imp ({inner} inner loop)")
            self.imp[inner] = prune.imp(self.build(), data, cfg.imp.rounds, cfg.imp.rate, cfg.imp.rewind_step, inner,
                                        scope=cfg.imp.scope, inner_cfg=cfg.inner_train, retrain_cfg=cfg.train,
                                        seed=cfg.seed, **self.train_options)
            out[inner] = self.imp[inner].rounds
        if cfg.imp.random_baseline:
            template = self.build()
            rewind = self.imp["real"].rewind
            records = []
            for i, record in enumerate(out["real"]):
                masks = prune.random_masks(template, record["density"], seed=cfg.seed + i)
                net = prune.subnetwork(template, rewind, masks)
                outcome = train(net, *self.train_data, cfg.train, cfg.seed, test=self.test_data, **self.train_options)
                records.append({"round": i, "density": prune.density(masks), "test_accuracy": outcome.test_accuracy,
                                "train_points_used": 0})
            out["random"] = records
        return out

    def stage_lmc(self) -> dict:
        cfg = self.cfg
        alphas = lmc.alpha_grid(cfg.lmc.alphas)
        has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in self.build().modules())
        reset = cfg.lmc.bn_reset and has_batch_norm
        out = {}
        for kind in NETWORKS:
            self.say(f"lmc ({kind})")
            template, masks, rewind = self.network(kind)
            copies = []
            for seed in cfg.lmc.seeds:
                net = prune.subnetwork(template, rewind, masks)
                train(net, *self.train_data, cfg.train, seed, **self.train_options)
                copies.append(net)
            self.pairs[kind] = tuple(copies)
            curves = {}  # train and test, and both after a BatchNorm reset, as fastmask.lmc.instability computes
            for split, loader in (("train", self.train_eval_loader), ("test", self.test_loader)):
                curves[split] = lmc.curve(*copies, alphas, loader, self.device)
                if reset:
                    curves[f"{split}_reset"] = lmc.curve(*copies, alphas, loader, self.device,
                                                         reset_loader=self.train_eval_loader)
            entry = {"alphas": alphas, "test_loss": curves["test"][0], "test_error": curves["test"][1],
                     "barrier_loss": lmc.barrier(alphas, curves["test"][0]),
                     "barrier_error": lmc.barrier(alphas, curves["test"][1]),
                     "train_loss": curves["train"][0], "train_error": curves["train"][1],
                     "train_barrier_loss": lmc.barrier(alphas, curves["train"][0]),
                     "train_barrier_error": lmc.barrier(alphas, curves["train"][1]),
                     "density": prune.density(masks) if masks else 1.0}
            if reset:
                losses, errors = curves["test_reset"]
                entry["bn_reset"] = {"test_loss": losses, "test_error": errors,
                                     "barrier_loss": lmc.barrier(alphas, losses),
                                     "barrier_error": lmc.barrier(alphas, errors)}
            out[kind] = entry
        return out

    def stage_landscape(self) -> dict:
        if not self.cfg.landscape.enabled:
            return {}
        out = {}
        for kind in NETWORKS:
            template, masks, rewind = self.network(kind)
            start = prune.subnetwork(template, rewind, masks)
            out[kind] = landscape.plane(start, *self.pairs[kind], self.test_loader, self.cfg.landscape.grid,
                                        self.device)
        return out

    def hessian_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``hessian.examples`` training examples in batches of ``hessian.batch_size``: the
        Hessian's mean loss (the hessian stage's and the study's)."""
        cfg = self.cfg.hessian
        images, labels = self.train_data
        examples = min(cfg.examples, len(images))
        return [(images[i:min(i + cfg.batch_size, examples)], labels[i:min(i + cfg.batch_size, examples)])
                for i in range(0, examples, cfg.batch_size)]

    def stage_hessian(self) -> dict:
        batches = self.hessian_batches()
        return {kind: hessian.hutchinson(self.pairs[kind][0], batches, self.cfg.hessian.num_probes, self.cfg.seed,
                                         self.device) for kind in NETWORKS}

    def arm_masks(self, arm: str) -> tuple[dict, list[dict], list[int]]:
        """(rewind weights, masks per round, training points spent per round) of a study arm: the imp
        stage's real and distilled runs, its random baseline's masks, or the hybrid's own IMP."""
        cfg = self.cfg
        if arm in ("real", "distilled"):
            outcome = self.imp[arm]
            return outcome.rewind, outcome.masks, [r["train_points_used"] for r in outcome.rounds]
        if arm == "random":  # the imp stage's random baseline: the same masks, no training to find them
            template, real = self.build(), self.imp["real"]
            masks = [prune.random_masks(template, r["density"], seed=cfg.seed + i) for i, r in enumerate(real.rounds)]
            return real.rewind, masks, [0] * len(masks)
        if arm != "hybrid":
            raise ValueError(f"study arm {arm!r} is not written in the eager reference pipeline")
        self.say("study (hybrid IMP)")
        inner = ["distilled"] * cfg.study.hybrid_rounds + ["real"] * (cfg.imp.rounds - cfg.study.hybrid_rounds)
        data = {"train": self.train_data, "test": self.test_data, "distilled": self.synthetic}
        outcome = prune.imp(self.build(), data, cfg.imp.rounds, cfg.imp.rate, cfg.imp.rewind_step, inner,
                            scope=cfg.imp.scope, inner_cfg=cfg.inner_train, retrain_cfg=cfg.train, seed=cfg.seed,
                            retrain=False, **self.train_options)
        return outcome.rewind, outcome.masks, [r["train_points_used"] for r in outcome.rounds]

    def stage_study(self) -> dict:
        """Every arm of ``study.arms`` at every density over ``study.seeds`` (``bench.reference.study``);
        ``{}`` without arms (fastmask's default)."""
        if not self.cfg.study.arms:
            return {}
        arms = {arm: self.arm_masks(arm) for arm in self.cfg.study.arms}
        options = {k: v for k, v in self.train_options.items() if k != "device"}
        return study.run(self.cfg, arms, self.imp["real"].rewind, self.build(), self.train_data, self.test_data,
                         self.hessian_batches(), self.device, say=self.say, batch_size=EVAL_BATCH, **options)


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_workers(device: torch.device) -> int:
    """DataLoader worker processes: 4 on a GPU machine (as the papers' scripts use), 0 on the CPU."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def run_reference(cfg: PipelineConfig, out_dir=None, *, num_workers: int | None = None, compile: bool = False,
                  quiet: bool = True) -> dict:
    """Run the eager reference pipeline for ``cfg``; returns the results dict (fastmask's
    ``results.json`` schema, plus ``"implementation"``) and, with ``out_dir``, writes it there as
    ``results.json``. ``compile`` puts the model of every training run (and its final test evaluation)
    under ``torch.compile``; the per-alpha, per-point and per-probe loops stay eager (double backward
    does not compile).
    """
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"cfg must be a fastmask.config.PipelineConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    workers = default_workers(device) if num_workers is None else num_workers
    run = _Reference(cfg, device, workers, compile, quiet)
    results = {"fastmask_version": fastmask.__version__, "implementation": "eager reference"
               + (" (torch.compile)" if compile else ""), "config": to_dict(cfg),
               "device": {"type": device.type, "name": device_name(device)}, "stages": {}, "timings": {},
               "data": {"train_size": len(run.train_data[0]), "test_size": len(run.test_data[0])}}
    for stage in STAGES:
        run.say(f"stage {stage}")
        start = time.perf_counter()
        results["stages"][stage] = getattr(run, f"stage_{stage}")()
        _synchronize(device)
        results["timings"][stage] = time.perf_counter() - start
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / "results.json.tmp"
        temporary.write_text(json.dumps(results, indent=1))
        temporary.replace(folder / "results.json")
    return results
