"""Wall time of IMP (20% per round, global magnitude, rewind to initialisation) of ConvNet-3 with
the real and the distilled inner loop, every round's mask retrained on the real data.

Cases: on a GPU 5 rounds on CIFAR-shaped synthetic data (10,000 train / 2,000 test images) with
the hyperparameters of the ``synthetic-convnet3`` preset (retraining 5 epochs of batch 256; the
distilled inner loop 200 steps of batch 100 on 10 images per class); on the CPU 2 rounds on
digits with ConvNet-3 width 128 and the ``digits-convnet3`` preset's settings, retraining
shortened to 60 steps and the inner loop to 50, without the compiled reference (it compiles every
network it trains: minutes on the CPU).

Contenders:
- ``reference``: ``bench.reference.prune.imp``: ``torch.nn.utils.prune.global_unstructured``
  masks, a fresh copy of the network per round, a DataLoader and a Python training loop, every
  training run one after another (as the authors' code does);
- ``reference_compiled``: the same with the models under ``torch.compile``;
- ``fastmask``: ``fastmask.prune.imp`` (fused masked kernels and optimizer on a GPU,
  device-resident data, the masks retrained several at a time as one stack).
Each contender is timed as a whole run after a short warm-up run (one round of a few steps, so
that kernel compilation, autotuning and the dispatch choice are not timed). Target (issue 8): >= 4x.

Run: .venv/bin/python -m pytest bench/bench_prune.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastmask.models as fastmask_models
from fastmask import data, prune as fastmask_prune
from fastmask.config import load_config
from fastmask.distill import random_real

from bench.harness import case, cases
from bench.reference import models, prune
from bench.reference.pipeline import default_workers


@dataclasses.dataclass(frozen=True)
class IMPCase:
    preset: str
    rounds: int
    overrides: tuple = ()  # of the preset, as key=value strings
    data: str = "synthetic"  # "digits" or "synthetic" of `shape`
    shape: tuple = (3, 32, 32)
    compiled: bool = True  # whether the compiled reference is a contender

    def config(self):
        return load_config(self.preset, None, list(self.overrides))


GPU = [IMPCase("synthetic-convnet3", 5)]
CPU = [IMPCase("digits-convnet3", 2, ("train.steps=60", "inner_train.steps=50"), data="digits", shape=(1, 8, 8),
               compiled=False)]
SMOKE = [IMPCase("synthetic-convnet3", 2, ("data.train_size=64", "data.test_size=16", "train.steps=2",
                                           "train.batch_size=16", "inner_train.steps=2", "inner_train.batch_size=10",
                                           "distill.images_per_class=1", "model.width=8"), shape=(3, 8, 8))]
CASES = cases(gpu=[case("convnet3-synthetic", c) for c in GPU], cpu=[case("convnet3-digits", c) for c in CPU],
              smoke=[case("convnet3-smoke", c) for c in SMOKE])


@pytest.mark.parametrize("inner", ["real", "distilled"])
@pytest.mark.parametrize("c", CASES)
def bench_imp(bench, c, inner):
    cfg = c.config()
    train_cfg, inner_cfg, per_class = cfg.train, cfg.inner_train, cfg.distill.images_per_class
    if c.data == "digits":
        splits = data.load("digits", device=bench.device)
    else:
        splits = data.load("synthetic", device=bench.device, shape=c.shape, train_size=cfg.data.train_size,
                           test_size=cfg.data.test_size)
    shape = splits.train.image_shape
    options = {} if cfg.model.width is None else {"width": cfg.model.width}
    distilled = random_real(splits.train, per_class, seed=0)
    cpu = {"train": (splits.train.images.cpu(), splits.train.labels.cpu()),
           "test": (splits.test.images.cpu(), splits.test.labels.cpu()),
           "distilled": (distilled.images.cpu(), distilled.labels.cpu())}
    workers = default_workers(bench.device)

    def run_fastmask(rounds_, train_, inner_):
        torch.manual_seed(0)
        model = fastmask_models.create("convnet3", 10, shape, **options).to(bench.device)
        return fastmask_prune.imp(model, splits, rounds_, cfg.imp.rate, 0, inner, distilled=distilled,
                                  inner_cfg=inner_, retrain_cfg=train_, seed=0, retrain_stack=cfg.imp.retrain_stack,
                                  progress=False).rounds

    def run_reference(rounds_, train_, inner_, compile_=False):
        torch.manual_seed(0)
        template = models.create("convnet3", 10, shape, **options).to(bench.device)
        return prune.imp(template, cpu, rounds_, cfg.imp.rate, 0, inner, scope="global", inner_cfg=inner_,
                         retrain_cfg=train_, seed=0, device=bench.device, num_workers=workers, compile=compile_).rounds

    runs = {"reference": lambda *a: run_reference(*a), "reference_compiled": lambda *a: run_reference(*a, True),
            "fastmask": run_fastmask}
    if not c.compiled:
        del runs["reference_compiled"]
    short_train, short_inner = (dataclasses.replace(x, steps=2, epochs=1.0) for x in (train_cfg, inner_cfg))
    records = {}
    if not bench.smoke:
        for run in runs.values():
            run(1, short_train, short_inner)  # warm-up: compilation, autotuning, the dispatch's choices
    contenders = {name: (lambda name=name, run=run: records.__setitem__(name, run(c.rounds, train_cfg, inner_cfg)))
                  for name, run in runs.items()}
    times = bench.measure(contenders, compiled=["reference_compiled"], whole_runs=True, warmed_up=True)
    extra = {"speedup_vs_reference_compiled": bench.speedup(times, "fastmask", "reference_compiled")} \
        if "reference_compiled" in times else {}
    bench.row(f"convnet3 IMP {c.rounds} rounds, {inner} inner loop, {len(splits.train)} images {shape[1]}x{shape[2]}",
              times, baseline="reference", **extra,
              test_accuracy={name: [r["test_accuracy"] for r in rs] for name, rs in records.items()},
              density=[r["density"] for r in records["fastmask"]])
    assert [r["density"] for r in records["fastmask"]] == [r["density"] for r in records["reference"]]
