"""Wall time of 5 IMP rounds (20% per round, global magnitude, rewind to initialisation) of
ConvNet-3 on CIFAR-shaped synthetic data (10,000 train / 2,000 test images), with the real and
the distilled inner loop, every round's mask retrained on the real data: the hyperparameters of
the ``synthetic-convnet3`` preset (retraining 5 epochs of batch 256; the distilled inner loop 200
steps of batch 100 on 10 images per class).

Contenders:
- ``reference``: ``bench.reference.prune.imp``: ``torch.nn.utils.prune.global_unstructured``
  masks, a fresh copy of the network per round, a DataLoader and a Python training loop, every
  training run one after another (as the authors' code does);
- ``reference_compiled``: the same with the models under ``torch.compile``;
- ``fastmask``: ``fastmask.prune.imp`` (fused masked kernels and optimizer, device-resident data,
  the masks retrained 4 at a time as one stack).
Each contender runs once after a short warm-up run (one round of a few steps, so that kernel
compilation, autotuning and the dispatch choice are not timed). Target (issue 8): >= 4x.

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

from bench.reference import models, prune
from bench.reference.pipeline import default_workers

ROUNDS = 5
PRESET = "synthetic-convnet3"


@pytest.mark.parametrize("inner", ["real", "distilled"])
def bench_imp(bench, inner):
    cfg = load_config(PRESET)
    shape, train_size, test_size, rounds, options = (3, 32, 32), cfg.data.train_size, cfg.data.test_size, ROUNDS, {}
    train_cfg, inner_cfg, per_class = cfg.train, cfg.inner_train, cfg.distill.images_per_class
    if bench.smoke:
        shape, train_size, test_size, rounds, options, per_class = (3, 8, 8), 64, 16, 2, {"width": 8}, 1
        train_cfg = dataclasses.replace(train_cfg, steps=2, batch_size=16)
        inner_cfg = dataclasses.replace(inner_cfg, steps=2, batch_size=10)
    splits = data.load("synthetic", device=bench.device, shape=shape, train_size=train_size, test_size=test_size)
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

    contenders = {"reference": lambda *a: run_reference(*a), "reference_compiled": lambda *a: run_reference(*a, True),
                  "fastmask": run_fastmask}
    if bench.smoke:
        del contenders["reference_compiled"]  # compiling takes minutes on the CPU (checked in bench_train)
    short_train, short_inner = (dataclasses.replace(c, steps=2, epochs=1.0) for c in (train_cfg, inner_cfg))
    times, records = {}, {}
    for name, fn in contenders.items():
        if not bench.smoke:
            fn(1, short_train, short_inner)  # warm-up: compilation, autotuning, the dispatch's choices
        times[name] = bench.wall_ms(lambda: records.setdefault(name, fn(rounds, train_cfg, inner_cfg)))
    extra = {"speedup_vs_reference_compiled": times["reference_compiled"] / times["fastmask"]} \
        if "reference_compiled" in times else {}
    bench.row(f"convnet3 IMP {rounds} rounds, {inner} inner loop, {train_size} images {shape[1]}x{shape[2]}", times,
              baseline="reference", **extra,
              test_accuracy={name: [r["test_accuracy"] for r in rs] for name, rs in records.items()},
              density=[r["density"] for r in records["fastmask"]])
    assert [r["density"] for r in records["fastmask"]] == [r["density"] for r in records["reference"]]
