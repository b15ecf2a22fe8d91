"""The study's unit of work: one subnetwork measured over seeds (``fastmask.study.measure``: 2 x
seeds copies trained from the rewind weights with different data orders, each pair interpolated on
train and test, the Hessian trace of the first copy), with its copies as one stack against stacks
of one (``study.stacked=false`` in the pipeline).

Contenders, each one whole ``measure`` call on the same subnetwork:
- ``stacks_of_one``: every copy trained alone (``stack_size=1``), the loop a researcher would write;
- ``fastmask``: all copies as one stack, as the study stage runs them: one stacked pass per step on
  a GPU; on the CPU ``fit`` trains a stack's models one after another
  (``train.STACK_ONE_AT_A_TIME_DEVICES``), so the two contenders run the same trainings there.

Cases: on a GPU 2,000 CIFAR-shaped images (3 x 32 x 32), ConvNet-3 width 128 at 20% density, 3
seeds (6 copies), 100 steps of batch 256, 11 alphas, 16 Hutchinson probes on 256 images. On the
CPU the digits training set with ConvNet-3 width 128, 2 seeds (4 copies), 60 steps of batch 64.
Target (issue 19): stacks faster than stacks of one on a GPU; not slower on the CPU.

Run: .venv/bin/python -m pytest bench/bench_study.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import dataclasses

import pytest

from fastmask import data, masks as masks_module, study
from fastmask.train import TrainConfig

from bench.bench_lmc import masked_models
from bench.harness import case, cases


@dataclasses.dataclass(frozen=True)
class StudyCase:
    options: tuple = ()  # ConvNet-3 options as (name, value) pairs
    data: str = "synthetic"  # "digits", or "synthetic" of `shape`
    shape: tuple = (3, 32, 32)
    images: int = 2000
    seeds: int = 3
    steps: int = 100
    batch: int = 256
    alphas: int = 11
    probes: int = 16
    hessian_images: int = 256

    def describe(self) -> str:
        options = "".join(f" {key}={value}" for key, value in self.options)
        where = "digits" if self.data == "digits" else f"images={self.images} {self.shape[1]}x{self.shape[2]}"
        return (f"convnet3{options} {2 * self.seeds} copies, {self.steps} steps of batch {self.batch}, "
                f"alphas={self.alphas} probes={self.probes} {where}")


GPU = [StudyCase()]
CPU = [StudyCase(data="digits", shape=(1, 8, 8), seeds=2, steps=60, batch=64, probes=8)]
SMOKE = [StudyCase((("width", 8),), shape=(3, 8, 8), images=48, seeds=2, steps=2, batch=16, alphas=3, probes=2,
                   hessian_images=16)]
# Headline on a GPU: the last ratio ``make gpu-session`` measures, if its window has time left.
CASES = cases(gpu=[case("convnet3-32px", c, headline=True) for c in GPU],
              cpu=[case("convnet3-digits", c) for c in CPU], smoke=[case("convnet3-8px", c, headline=True) for c in SMOKE])


@pytest.mark.parametrize("c", CASES)
def bench_study_measure(bench, c):
    if c.data == "digits":
        splits = data.load("digits", device=bench.device)
    else:
        splits = data.load("synthetic", device=bench.device, shape=c.shape, train_size=c.images,
                           test_size=c.images // 2)
    model = masked_models("convnet3", dict(c.options), splits.train.image_shape, [0], bench.device)[0].train()
    masks = masks_module.of(model)
    rewind = {key: value.clone() for key, value in model.state_dict().items()}
    cfg = TrainConfig(steps=c.steps, batch_size=c.batch, lr=0.05, augment=False)
    train = splits.train
    hessian_batches = [(train.images[:c.hessian_images], train.labels[:c.hessian_images])]

    def measure(stack_size):
        return lambda: study.measure(model, masks, rewind, splits, cfg, c.seeds, alphas=c.alphas,
                                     hessian_batches=hessian_batches, hessian_probes=c.probes, stack_size=stack_size)

    times = bench.measure({"stacks_of_one": measure(1), "fastmask": measure(None)}, whole_runs=True)
    bench.row(c.describe(), times, baseline="stacks_of_one")
