"""Training throughput (images per second) of ConvNet-3 and CIFAR ResNet-18 on CIFAR-shaped
synthetic data (10,000 images of 3 x 32 x 32), masked at 20% density, SGD with momentum and
weight decay, batch 256, random crop and flip, bf16 autocast and channels_last on CUDA.

Contenders, each running the same number of steps of the same configuration:
- ``reference``: the eager reference (``bench.reference.train``): a torchvision-style DataLoader
  over CPU tensors with a per-sample crop / flip and worker processes, ``torch.nn.utils.prune``
  masks, ``torch.optim.SGD`` with per-tensor re-masking, a Python step loop;
- ``reference_compiled``: the same with the model under ``torch.compile``;
- ``fastmask``: ``fastmask.train.fit`` on device-resident data (fused masked kernels, the fused
  masked optimizer, augmentation on the device, each step's forward and backward replayed from a
  CUDA graph);
- ``fastmask_no_graph``: the same with ``cuda_graph=False`` (every kernel launched from Python),
  which shows what the graph is worth;
- two models: ``fastmask_sequential_2`` (two ``fit`` calls, one after the other) against
  ``fastmask_stack_2`` (one ``fit`` of a ``Stack`` of the two, each with its own data order).
Targets (issue 5): fastmask >= 3x the reference for one model; the stack of 2 >= 1.7x the
throughput of the 2 sequential models. Each timed call is a whole training run (loader and
optimizer set-up included, as a user pays it), so the medians come from a few runs only.

Run: .venv/bin/python -m pytest bench/bench_train.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastmask.models as fastmask_models
from fastmask import data
from fastmask.masks import apply as fastmask_apply_masks
from fastmask.stack import Stack
from fastmask.train import TrainConfig, fit

from bench.reference import models, prune
from bench.reference.pipeline import default_workers
from bench.reference.train import train

DENSITY = 0.2
IMAGES = 10_000
CASES = {"convnet3": 100, "resnet18": 50}  # model -> training steps per timed run


def _twins(name: str, shape, options: dict, device):
    """A fastmask model and a reference model with the same initial weights and random masks."""
    torch.manual_seed(0)
    ours = fastmask_models.create(name, 10, shape, **options)
    torch.manual_seed(0)
    reference = models.create(name, 10, shape, **options)
    masks = prune.random_masks(reference, DENSITY, seed=0)
    fastmask_apply_masks(ours, masks)
    prune.apply_masks(reference, masks)
    return ours.to(device), reference.to(device)


@pytest.mark.parametrize("name", list(CASES))
def bench_train_throughput(bench, name):
    smoke = bench.smoke
    shape = (3, 8, 8) if smoke else (3, 32, 32)
    images = 64 if smoke else IMAGES
    steps = 2 if smoke else CASES[name]
    options = {"width": 8} if smoke else {}
    cfg = TrainConfig(steps=steps, batch_size=16 if smoke else 256, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", augment=True)
    splits = data.load("synthetic", device=bench.device, shape=shape, train_size=images, test_size=16)
    cpu_images, cpu_labels = splits.train.images.cpu(), splits.train.labels.cpu()
    workers = default_workers(bench.device)
    ours, reference = _twins(name, shape, options, bench.device)
    reference_for_compile = prune.copy_model(reference)
    second = copy.deepcopy(ours)
    stack = Stack([copy.deepcopy(ours), copy.deepcopy(ours)]).to(bench.device)

    contenders = {
        "reference": lambda: train(reference, cpu_images, cpu_labels, cfg, 0, bench.device, num_workers=workers),
        "reference_compiled": lambda: train(reference_for_compile, cpu_images, cpu_labels, cfg, 0, bench.device,
                                           num_workers=workers, compile=True),
        "fastmask": lambda: fit(ours, splits.train, cfg, seed=0, progress=False),
        "fastmask_no_graph": lambda: fit(ours, splits.train, dataclasses.replace(cfg, cuda_graph=False), seed=0,
                                         progress=False),
    }
    if smoke and name != "convnet3":  # compiling a whole model takes ~40 s on the CPU: check it once
        del contenders["reference_compiled"]
    times = {name_: bench.time(fn, rep_ms=1) for name_, fn in contenders.items()}
    batch = min(cfg.batch_size, images)
    extra = {"speedup_vs_reference_compiled": times["reference_compiled"] / times["fastmask"]} \
        if "reference_compiled" in times else {}
    bench.row(f"{name} one model, {steps} steps of batch {batch}, {shape[1]}x{shape[2]}, density {DENSITY}", times,
              baseline="reference", **extra, images_per_second={k: steps * batch / (t * 1e-3) for k, t in times.items()},
              workers=workers)

    pair = {"fastmask_sequential_2": lambda: (fit(ours, splits.train, cfg, seed=0, progress=False),
                                               fit(second, splits.train, cfg, seed=1, progress=False)),
            "fastmask_stack_2": lambda: fit(stack, splits.train, cfg, seed=[0, 1], progress=False)}
    pair_times = {name_: bench.time(fn, rep_ms=1) for name_, fn in pair.items()}
    bench.row(f"{name} two models, {steps} steps of batch {batch} each", pair_times, baseline="fastmask_sequential_2",
              images_per_second={k: 2 * steps * batch / (t * 1e-3) for k, t in pair_times.items()})
