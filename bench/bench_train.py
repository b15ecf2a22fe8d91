"""Training: one masked model (20% density), and two at once, SGD with momentum and weight decay.

Contenders for one model, each running the same steps of the same configuration:
- ``reference``: the eager reference (``bench.reference.train``): a torchvision-style DataLoader
  over CPU tensors with a per-sample crop / flip (worker processes on a GPU machine),
  ``torch.nn.utils.prune`` masks, ``torch.optim.SGD`` with per-tensor re-masking, a Python step loop;
- ``reference_compiled``: the same with the model under ``torch.compile``;
- ``reference_own_process`` (CPU): the reference in a child process that never imports fastmask
  (``bench.reference.own_process``), so with glibc's malloc as it is by default; fastmask, imported
  in this process, keeps freed CPU memory (``fastmask.backend.keep_freed_cpu_memory``) for both of
  the other contenders. This is the loop a researcher runs, in the process they run it in;
- ``fastmask``: ``fastmask.train.fit`` on device-resident data (on a GPU the fused masked kernels
  and optimizer, augmentation on the device, each step's forward and backward replayed from a
  CUDA graph);
- ``fastmask_no_graph`` (GPU): the same with ``cuda_graph=False`` (every kernel launched from
  Python), which shows what the graph is worth.
For two models: ``fastmask_sequential_2`` (two ``fit`` calls, one after the other) against
``fastmask_stack_2`` (one ``fit`` of a ``Stack`` of the two, each with its own data order, on the
path ``fit`` chooses for the device: ``train.STACK_ONE_AT_A_TIME_DEVICES``, one model at a time on
the CPU and CUDA) and the other path forced (``fastmask_stack_2_stacked_pass``, or
``fastmask_stack_2_one_at_a_time`` on a device that trains stacked): the measurement behind the choice.

Cases: on a GPU 10,000 CIFAR-shaped images (3 x 32 x 32), batch 256, random crop and flip, cosine
schedule, bf16 autocast and channels_last, ConvNet-3 (100 steps; both its cases are headlines of
``make gpu-session``) and ResNet-18 (50 steps). On the CPU the digits training set (1 x 8 x 8,
1437 images) with ConvNet-3 width 128, 60 steps of batch 64 without augmentation (the
``digits-convnet3`` preset's training; headline, both rows), and 1000 Fashion-MNIST-shaped images
with ResNet-10 width 16, 30 steps of batch 64 with crop and flip.
Targets (issue 5): fastmask >= 3x the reference for one model; the stack of 2 >= 1.7x the
throughput of the 2 sequential models. Each timed call is a whole training run (loader and
optimizer set-up included, as a user pays it), timed as a whole run.

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
from fastmask.train import STACK_ONE_AT_A_TIME_DEVICES, TrainConfig, fit

from bench.harness import case, cases
from bench.reference import models, prune
from bench.reference.own_process import OwnProcessTraining
from bench.reference.pipeline import default_workers
from bench.reference.train import train

DENSITY = 0.2


@dataclasses.dataclass(frozen=True)
class TrainCase:
    arch: str
    steps: int
    options: tuple = ()  # model options as (name, value) pairs
    data: str = "synthetic"  # "digits" (the real training set) or "synthetic" of `shape`
    shape: tuple = (3, 32, 32)
    images: int = 10_000
    batch: int = 256
    augment: bool = True
    lr: float = 0.01
    schedule: str = "cosine"
    smoke_compiled: bool = False

    def config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch, lr=self.lr, momentum=0.9, weight_decay=5e-4,
                           schedule=self.schedule, augment=self.augment)

    def describe(self, models_: str) -> str:
        options = "".join(f" {key}={value}" for key, value in self.options)
        where = "digits" if self.data == "digits" else f"{self.shape[1]}x{self.shape[2]}"
        return (f"{self.arch}{options} {models_}, {self.steps} steps of batch {self.batch}, {where}, "
                f"density {DENSITY}")


GPU = [TrainCase("convnet3", 100), TrainCase("resnet18", 50)]
CPU = [TrainCase("convnet3", 60, data="digits", shape=(1, 8, 8), batch=64, augment=False, lr=0.05),
       TrainCase("resnet10", 30, (("width", 16),), shape=(1, 28, 28), images=1000, batch=64)]
SMOKE = [TrainCase("convnet3", 2, (("width", 8),), shape=(3, 8, 8), images=64, batch=16, smoke_compiled=True),
         TrainCase("resnet18", 2, (("width", 8),), shape=(3, 8, 8), images=64, batch=16)]


def _table(items, headline=()):
    return [case(f"{c.arch}-{c.data if c.data == 'digits' else c.shape[1]}", c, headline=c in headline) for c in items]


ONE_MODEL_CASES = cases(gpu=_table(GPU, GPU[:1]), cpu=_table(CPU, CPU[:1]), smoke=_table(SMOKE))
TWO_MODEL_CASES = cases(gpu=_table(GPU, GPU[:1]), cpu=_table(CPU, CPU[:1]), smoke=_table(SMOKE, SMOKE[:1]))


def _twins(c: TrainCase, shape, device):
    """A fastmask model and a reference model with the same initial weights and random masks."""
    options = dict(c.options)
    torch.manual_seed(0)
    ours = fastmask_models.create(c.arch, 10, shape, **options)
    torch.manual_seed(0)
    reference = models.create(c.arch, 10, shape, **options)
    masks = prune.random_masks(reference, DENSITY, seed=0)
    fastmask_apply_masks(ours, masks)
    prune.apply_masks(reference, masks)
    return ours.to(device), reference.to(device)


def _splits(c: TrainCase, device):
    if c.data == "digits":
        return data.load("digits", device=device)
    return data.load("synthetic", device=device, shape=c.shape, train_size=c.images, test_size=16)


@pytest.mark.parametrize("c", ONE_MODEL_CASES)
def bench_train_one_model(bench, c):
    cfg = c.config()
    splits = _splits(c, bench.device)
    cpu_images, cpu_labels = splits.train.images.cpu(), splits.train.labels.cpu()
    workers = default_workers(bench.device)
    ours, reference = _twins(c, splits.train.image_shape, bench.device)
    reference_for_compile = prune.copy_model(reference)
    contenders = {
        "reference": lambda: train(reference, cpu_images, cpu_labels, cfg, 0, bench.device, num_workers=workers),
        "reference_compiled": lambda: train(reference_for_compile, cpu_images, cpu_labels, cfg, 0, bench.device,
                                           num_workers=workers, compile=True),
        "fastmask": lambda: fit(ours, splits.train, cfg, seed=0, progress=False),
    }
    if bench.device.type == "cuda":
        contenders["fastmask_no_graph"] = lambda: fit(ours, splits.train, dataclasses.replace(cfg, cuda_graph=False),
                                                      seed=0, progress=False)
    own_process = None
    if bench.device.type == "cpu":
        own_process = OwnProcessTraining(c.arch, dict(c.options), prune.get_masks(reference), reference.state_dict(),
                                         cpu_images, cpu_labels, cfg)
        contenders["reference_own_process"] = own_process
    try:
        times = bench.measure(contenders, compiled=["reference_compiled"], whole_runs=True,
                              smoke_compiled=c.smoke_compiled)
    finally:
        if own_process is not None:
            own_process.close()
    batch = min(cfg.batch_size, len(splits.train))
    extra = {f"speedup_vs_{name}": bench.speedup(times, "fastmask", name)
             for name in ("reference_compiled", "reference_own_process") if name in times}
    bench.row(c.describe("one model"), times, baseline="reference", **extra, workers=workers,
              images_per_second={k: c.steps * batch / (min(t) * 1e-3) for k, t in times.items()})


@pytest.mark.parametrize("c", TWO_MODEL_CASES)
def bench_train_two_models(bench, c):
    cfg = c.config()
    splits = _splits(c, bench.device)
    first, _ = _twins(c, splits.train.image_shape, bench.device)
    second = copy.deepcopy(first)
    stack = Stack([copy.deepcopy(first), copy.deepcopy(first)]).to(bench.device)
    contenders = {"fastmask_sequential_2": lambda: (fit(first, splits.train, cfg, seed=0, progress=False),
                                                     fit(second, splits.train, cfg, seed=1, progress=False)),
                  "fastmask_stack_2": lambda: fit(stack, splits.train, cfg, seed=[0, 1], progress=False)}
    # The path fit does not choose on this device, forced: the measurement behind the choice.
    if bench.device.type in STACK_ONE_AT_A_TIME_DEVICES:
        contenders["fastmask_stack_2_stacked_pass"] = lambda: fit(stack, splits.train, cfg, seed=[0, 1],
                                                                  progress=False, one_at_a_time=False)
    else:
        contenders["fastmask_stack_2_one_at_a_time"] = lambda: fit(stack, splits.train, cfg, seed=[0, 1],
                                                                   progress=False, one_at_a_time=True)
    times = bench.measure(contenders, whole_runs=True)
    batch = min(cfg.batch_size, len(splits.train))
    bench.row(c.describe("two models"), times, baseline="fastmask_sequential_2",
              images_per_second={k: 2 * c.steps * batch / (min(t) * 1e-3) for k, t in times.items()})
