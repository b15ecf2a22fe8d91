"""Distillation iterations per second, 10 images per class, ConvNet-3 (instance norm): fastmask
against the eager loop of the reference code, which runs one network and one class at a time. On
a GPU CIFAR-shaped data (3 x 32 x 32), width 128, real batches of 256, DSA's (outer, inner) loops
(10, 50): the paper's at 10 images per class; on the CPU digits-shaped data (1 x 8 x 8), width
32, real batches of 64, DSA loops (2, 2).

- ``dm``: one iteration = K fresh frozen random networks, for every class a real batch and the
  class's synthetic images under one DSA draw, the embedding-mean loss, one image step.
- ``dsa``: one iteration = K fresh networks, the outer loop's matching steps (gradient matching
  over every class, one image step each) with the inner loop's epochs of network training on the
  synthetic set between them.

The eager contenders use a plain ``nn.Conv2d`` ConvNet-3 defined here, built on the device each
iteration (the reference builds it on the CPU and copies it over, which is slower), and the same
DSA transforms (``fastmask.distill.augment``, one draw per class call, parameters drawn on the
device where the reference draws them on the CPU): both choices favour the baseline.
torch.compile is not a contender: gradient matching needs double backward, which compiled graphs
do not support, and DM rebuilds its networks every iteration.

Run: .venv/bin/python -m pytest bench/bench_distill.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import data
from fastmask.distill import DMConfig, DSAConfig, DistributionMatching, GradientMatching
from fastmask.distill.augment import DSA
from fastmask.distill.dsa import gradient_distance

from bench.harness import cases

CLASSES = 10
IPC = 10


class ConvNet3(nn.Module):
    """Three blocks of Conv(3x3, pad 1) - GroupNorm(one group per channel) - ReLU - AvgPool(2), then Linear."""

    def __init__(self, channels=3, width=128, size=32, classes=CLASSES):
        super().__init__()
        blocks = []
        for i in range(3):
            blocks += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1), nn.GroupNorm(width, width),
                       nn.ReLU(), nn.AvgPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width * (size // 8) ** 2, classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class EagerDistillation:
    """The reference code's loops: one network, one class, one forward (and backward) at a time."""

    def __init__(self, train, ipc, width, batch_real, num_networks, device):
        self.train, self.ipc, self.width, self.device = train, ipc, width, device
        self.batch_real, self.num_networks = batch_real, num_networks
        self.by_class = [train.class_indices(c) for c in range(CLASSES)]
        self.images = train.images[torch.cat([idx[:ipc] for idx in self.by_class])].clone().requires_grad_()
        self.labels = torch.arange(CLASSES, device=device).repeat_interleave(ipc)
        self.dsa = DSA(seed=0, device=device)
        self.size = train.image_shape[1:]

    def network(self):
        with torch.device(self.device):
            return ConvNet3(self.train.image_shape[0], self.width, self.size[0])

    def real(self, c):
        members = self.by_class[c]
        return self.train.images[members[torch.randperm(len(members), device=self.device)[: self.batch_real]]]

    def class_pair(self, c):
        """The class's real batch and synthetic images under one (siamese) DSA draw."""
        transform = self.dsa.sample((1,), self.size)
        return transform(self.real(c)), transform(self.images[c * self.ipc:(c + 1) * self.ipc])


class EagerDM(EagerDistillation):
    def __init__(self, *args):
        super().__init__(*args)
        self.optimizer = torch.optim.SGD([self.images], lr=1.0, momentum=0.5)

    def iteration(self):
        loss = 0
        for _ in range(self.num_networks):
            net = self.network()
            for p in net.parameters():
                p.requires_grad_(False)
            for c in range(CLASSES):
                real, syn = self.class_pair(c)
                loss = loss + (net.embed(real).detach().mean(0) - net.embed(syn).mean(0)).pow(2).sum()
        self.optimizer.zero_grad()
        (loss / self.num_networks).backward()
        self.optimizer.step()


class EagerDSA(EagerDistillation):
    def __init__(self, *args, outer_loop, inner_loop):
        super().__init__(*args)
        self.optimizer = torch.optim.SGD([self.images], lr=0.1, momentum=0.5)
        self.outer_loop, self.inner_loop = outer_loop, inner_loop

    def iteration(self):
        for _ in range(self.num_networks):
            net = self.network()
            net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            weights = [p for p in net.parameters() if p.dim() >= 2]  # 1-d gradients count 0 in the distance
            for outer in range(self.outer_loop):
                loss = 0
                for c in range(CLASSES):
                    real, syn = self.class_pair(c)
                    real_grads = torch.autograd.grad(
                        F.cross_entropy(net(real), torch.full((len(real),), c, device=self.device)), weights)
                    syn_grads = torch.autograd.grad(
                        F.cross_entropy(net(syn), torch.full((len(syn),), c, device=self.device)), weights,
                        create_graph=True)
                    loss = loss + sum(gradient_distance(r[None], s[None]) for r, s in zip(real_grads, syn_grads))
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                if outer == self.outer_loop - 1:
                    break
                images = self.images.detach()
                for _ in range(self.inner_loop):
                    order = torch.randperm(len(images), device=self.device)
                    for start in range(0, len(images), 256):
                        index = order[start:start + 256]
                        net_optimizer.zero_grad()
                        F.cross_entropy(net(self.dsa(images[index])), self.labels[index]).backward()
                        net_optimizer.step()


@dataclasses.dataclass(frozen=True)
class DistillSizes:
    """One device's sizes: images (C, H, W), images per class, network width, real images per
    class per step, DSA's (outer, inner) loops; IDC's and MTT's (bench_distill_ii) too."""
    shape: tuple
    ipc: int
    width: int
    batch_real: int
    dsa_loops: tuple
    idc_batch_real: int
    idc_inner_loop: int
    idc_train_images: int
    mtt_steps: int
    expert_images: int


SIZES = cases(gpu=DistillSizes((3, 32, 32), IPC, 128, 256, (10, 50), 64, 10, 2000, 30, 2560),
              cpu=DistillSizes((1, 8, 8), IPC, 32, 64, (2, 2), 32, 1, 200, 10, 640),
              smoke=DistillSizes((3, 8, 8), 2, 8, 4, (2, 1), 4, 2, 16, 2, 64))


def cifar_shaped(bench, per_class):
    """Random images of this device's shape (CIFAR's on a GPU, digits' on the CPU), ``per_class`` per class."""
    return data.load("synthetic", device=bench.device, shape=SIZES.shape, num_classes=CLASSES,
                     train_size=CLASSES * per_class, test_size=CLASSES).train


def _iteration_row(bench, case_text: str, eager, ours):
    times = bench.measure({"eager": eager.iteration, "fastmask": ours.step})
    bench.row(case_text, times, baseline="eager",
              iterations_per_s={name: 1000 / min(t) for name, t in times.items()})


@pytest.mark.parametrize("num_networks", [1, 4])
def bench_dm_iteration(bench, num_networks):
    ipc, width, batch_real = SIZES.ipc, SIZES.width, SIZES.batch_real
    train = cifar_shaped(bench, batch_real + 44)
    eager = EagerDM(train, ipc, width, batch_real, num_networks, bench.device)
    ours = DistributionMatching(train, ipc, DMConfig(num_networks=num_networks, batch_real=batch_real),
                                model_options={"width": width})
    _iteration_row(bench, f"dm K={num_networks} ipc={ipc} width={width} {SIZES.shape[1]}x{SIZES.shape[2]}", eager, ours)


@pytest.mark.parametrize("num_networks", [1, 4])
def bench_dsa_iteration(bench, num_networks):
    ipc, width, batch_real, loops = SIZES.ipc, SIZES.width, SIZES.batch_real, SIZES.dsa_loops
    train = cifar_shaped(bench, batch_real + 44)
    eager = EagerDSA(train, ipc, width, batch_real, num_networks, bench.device, outer_loop=loops[0],
                     inner_loop=loops[1])
    ours = GradientMatching(train, ipc, DSAConfig(num_networks=num_networks, batch_real=batch_real, outer_loop=loops[0],
                                                  inner_loop=loops[1]), model_options={"width": width})
    _iteration_row(bench, f"dsa K={num_networks} ipc={ipc} width={width} loops={loops} "
                          f"{SIZES.shape[1]}x{SIZES.shape[2]}", eager, ours)
