"""Distillation iterations per second on CIFAR-shaped data (3 x 32 x 32, 10 classes), 10 images
per class, ConvNet-3 (width 128, instance norm): fastmask against the eager loop of the reference
code, which runs one network and one class at a time.

- ``dm``: one iteration = K fresh frozen random networks, for every class a real batch of 256 and
  the class's 10 synthetic images under one DSA draw, the embedding-mean loss, one image step.
- ``dsa``: one iteration = K fresh networks, 10 matching steps (gradient matching over every
  class, one image step each) with 50 inner epochs of network training on the synthetic set
  between them: the paper's (outer, inner) = (10, 50) at 10 images per class.

The eager contenders use a plain ``nn.Conv2d`` ConvNet-3 defined here, built on the device each
iteration (the reference builds it on the CPU and copies it over, which is slower), and the same
DSA transforms (``fastmask.distill.augment``, one draw per class call, parameters drawn on the
device where the reference draws them on the CPU): both choices favour the baseline.
torch.compile is not a contender: gradient matching needs double backward, which compiled graphs
do not support, and DM rebuilds its networks every iteration.

Run: .venv/bin/python -m pytest bench/bench_distill.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import data
from fastmask.distill import DMConfig, DSAConfig, DistributionMatching, GradientMatching
from fastmask.distill.augment import DSA
from fastmask.distill.dsa import gradient_distance

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


def cifar_shaped(bench, per_class):
    shape = (3, 8, 8) if bench.smoke else (3, 32, 32)
    return data.load("synthetic", device=bench.device, shape=shape, num_classes=CLASSES,
                     train_size=CLASSES * per_class, test_size=CLASSES).train


@pytest.mark.parametrize("num_networks", [1, 4])
def bench_dm_iteration(bench, num_networks):
    ipc, width, batch_real = (2, 8, 4) if bench.smoke else (IPC, 128, 256)
    train = cifar_shaped(bench, batch_real + 44)
    eager = EagerDM(train, ipc, width, batch_real, num_networks, bench.device)
    ours = DistributionMatching(train, ipc, DMConfig(num_networks=num_networks, batch_real=batch_real),
                                model_options={"width": width})
    times = {"eager": bench.time(eager.iteration), "fastmask": bench.time(ours.step)}
    bench.row(f"dm K={num_networks} ipc={ipc}", times, baseline="eager",
              iterations_per_s={name: 1000 / ms for name, ms in times.items()})


@pytest.mark.parametrize("num_networks", [1, 4])
def bench_dsa_iteration(bench, num_networks):
    ipc, width, batch_real, loops = (2, 8, 4, (2, 1)) if bench.smoke else (IPC, 128, 256, (10, 50))
    train = cifar_shaped(bench, batch_real + 44)
    eager = EagerDSA(train, ipc, width, batch_real, num_networks, bench.device, outer_loop=loops[0],
                     inner_loop=loops[1])
    ours = GradientMatching(train, ipc, DSAConfig(num_networks=num_networks, batch_real=batch_real, outer_loop=loops[0],
                                                  inner_loop=loops[1]), model_options={"width": width})
    times = {"eager": bench.time(eager.iteration), "fastmask": bench.time(ours.step)}
    bench.row(f"dsa K={num_networks} ipc={ipc} loops={loops}", times, baseline="eager",
              iterations_per_s={name: 1000 / ms for name, ms in times.items()})
