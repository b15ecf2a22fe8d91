"""IDC and MTT iterations per second (and on a GPU peak memory), 10 images per class, ConvNet-3
(width 128, instance norm): fastmask against an eager loop that does the same work one network
(one student) at a time, as the reference code does. The sizes below are the GPU's (CIFAR-shaped
data, 3 x 32 x 32); on the CPU digits-shaped data (1 x 8 x 8), width 32, with fewer steps
(``bench_distill.SIZES``: IDC one matching step with 32 real images per class, MTT 10 student
steps, experts on 640 images).

- ``idc``: one iteration = K fresh networks, ``inner_loop`` matching steps (every class: 64 real
  images and the class's 40 decoded synthetic images under one augmentation draw, gradient
  matching on the conv weights, an image step), with the networks trained on 2000 real images
  (batches of 64) between them. The paper's iteration has 100 matching steps; the benchmark
  runs 10 (the time is linear in it) so that a timing stays within seconds.
- ``mtt``: one iteration = K students, each 30 SGD steps from an expert checkpoint on all 100
  synthetic images (DSA, an independent draw per image), the normalised distance to the expert
  2 epochs later, and the backward through the whole unroll to the images and the learning rate.
  The peak memory of this iteration is what the student unroll needs (all 30 steps' graphs are
  kept until the backward); the experts come from a buffer trained beforehand, untimed.
- ``mtt_experts``: one epoch of K experts on 2560 real images (batches of 256, DSA): fastmask
  trains the K as one stack, the eager loop one after another.

The eager contenders use plain ``nn.Conv2d`` modules (``bench_distill.ConvNet3``) built on the
device, fastmask's own decoding and augmentation transforms (parameters drawn on the device), and
``torch.func.functional_call`` on flat parameters for the MTT student (the reference code's
``ReparamModule`` does the same): choices that favour the baseline. torch.compile is not a
contender: both methods need double backward, which compiled graphs do not support.

Run: .venv/bin/python -m pytest bench/bench_distill_ii.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bench_distill import CLASSES, SIZES, ConvNet3, cifar_shaped
from fastmask.distill import IDC, IDCConfig, MTTConfig, TrajectoryMatching
from fastmask.distill.augment import DSA
from fastmask.distill.idc import MultiGroupAugment, decode
from fastmask.distill.mtt import ExpertBuffer, unflatten


def contenders(bench, case, functions, **extra):
    """Time each contender (and on a GPU measure its peak memory); one row."""
    times = bench.measure(functions)
    if bench.kind == "gpu":
        peaks = {name: bench.peak_memory(fn) for name, fn in functions.items()}
        extra["peak_memory_mib"] = {name: peak / 2**20 for name, peak in peaks.items()}
        print("  peak memory: " + ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in peaks.items()))
    bench.row(case, times, baseline="eager", iterations_per_s={name: 1000 / min(t) for name, t in times.items()},
              **extra)


# ---------------------------------------------------------------------------------------------- IDC


class EagerIDC:
    """IDC's loops: one network per iteration, one class per matching step and image step."""

    def __init__(self, train, ipc, width, num_networks, inner_loop, train_images, batch_real, device):
        self.train, self.ipc, self.width, self.device = train, ipc, width, device
        self.num_networks, self.inner_loop, self.train_images, self.batch_real = (num_networks, inner_loop,
                                                                                   train_images, batch_real)
        self.by_class = [train.class_indices(c) for c in range(CLASSES)]
        pixels = train.denormalize(train.images[torch.cat([idx[:ipc] for idx in self.by_class])]).clamp(0, 1)
        self.canvases = pixels.clone().requires_grad_()
        self.optimizer = torch.optim.SGD([self.canvases], lr=5e-3 * ipc / 10, momentum=0.5)
        self.augment = MultiGroupAugment("color_crop_cutout", seed=0, device=device)
        self.augment_train = MultiGroupAugment("color_crop", seed=1, device=device)

    def network(self):
        with torch.device(self.device):
            return ConvNet3(self.train.image_shape[0], self.width, self.train.image_shape[1])

    def match_class(self, net, c):
        members = self.by_class[c]
        real = self.train.images[members[torch.randperm(len(members), device=self.device)[:self.batch_real]]]
        syn = self.train.normalize(decode(self.canvases[c * self.ipc:(c + 1) * self.ipc], 2))
        both = self.augment.sample((1,), self.train.image_shape[1:])(torch.cat([real, syn]))
        real, syn = both[:len(real)], both[len(real):]
        weights = [p for p in net.parameters() if p.dim() == 4]
        real_grads = torch.autograd.grad(
            F.cross_entropy(net(real), torch.full((len(real),), c, device=self.device)), weights)
        syn_grads = torch.autograd.grad(
            F.cross_entropy(net(syn), torch.full((len(syn),), c, device=self.device)), weights, create_graph=True)
        return sum((r - s).pow(2).sum() for r, s in zip(real_grads, syn_grads))

    def iteration(self):
        for _ in range(self.num_networks):
            net = self.network()
            net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            with torch.no_grad():
                self.canvases.clamp_(0, 1)
            for inner in range(self.inner_loop):
                for c in range(CLASSES):
                    loss = self.match_class(net, c)
                    self.optimizer.zero_grad()
                    loss.backward()
                    self.optimizer.step()
                if inner == self.inner_loop - 1:
                    break
                order = torch.randperm(len(self.train), device=self.device)[:self.train_images]
                for start in range(0, len(order), 64):
                    index = order[start:start + 64]
                    net_optimizer.zero_grad()
                    logits = net(self.augment_train(self.train.images[index]))
                    F.cross_entropy(logits, self.train.labels[index]).backward()
                    net_optimizer.step()


@pytest.mark.parametrize("num_networks", [1, 4])
def bench_idc_iteration(bench, num_networks):
    ipc, width, batch_real = SIZES.ipc, SIZES.width, SIZES.idc_batch_real
    inner_loop, train_images = SIZES.idc_inner_loop, SIZES.idc_train_images
    train = cifar_shaped(bench, max(batch_real + 4 * ipc, train_images // CLASSES + 1))
    eager = EagerIDC(train, ipc, width, num_networks, inner_loop, train_images, batch_real, bench.device)
    config = IDCConfig(num_networks=num_networks, batch_real=batch_real, inner_loop=inner_loop,
                       train_images=train_images)
    ours = IDC(train, ipc, config, model_options={"width": width})
    contenders(bench, f"idc K={num_networks} ipc={ipc} inner_loop={inner_loop}",
               {"eager": eager.iteration, "fastmask": ours.step})


# ---------------------------------------------------------------------------------------------- MTT


class EagerMTT:
    """MTT's loop: one student at a time, a plain module called on its flat parameters."""

    def __init__(self, train, ipc, width, num_networks, syn_steps, buffer, device):
        self.train, self.num_networks, self.syn_steps, self.buffer, self.device = (train, num_networks, syn_steps,
                                                                                   buffer, device)
        with torch.device(device):
            self.net = ConvNet3(train.image_shape[0], width, train.image_shape[1])
        self.layout = [(name, tuple(p.shape)) for name, p in self.net.named_parameters()]
        by_class = [train.class_indices(c) for c in range(CLASSES)]
        self.images = train.images[torch.cat([idx[:ipc] for idx in by_class])].clone().requires_grad_()
        self.labels = torch.arange(CLASSES, device=device).repeat_interleave(ipc)
        self.lr = torch.tensor(0.01, device=device, requires_grad=True)
        self.image_optimizer = torch.optim.SGD([self.images], lr=100, momentum=0.5)
        self.lr_optimizer = torch.optim.SGD([self.lr], lr=1e-5, momentum=0.5)
        self.dsa = DSA(seed=0, device=device)

    def iteration(self):
        for k in range(self.num_networks):
            rows = self.buffer.checkpoints(k % len(self.buffer), [0, 2]).to(self.device)
            start, target = rows[0], rows[1]
            params = start.clone().requires_grad_(True)
            for _ in range(self.syn_steps):
                order = torch.randperm(len(self.images), device=self.device)
                named = {name: view[0] for name, view in unflatten(params[None], self.layout).items()}
                logits = functional_call(self.net, named, (self.dsa(self.images[order]),))
                (grad,) = torch.autograd.grad(F.cross_entropy(logits, self.labels[order]), params, create_graph=True)
                params = params - self.lr * grad
            loss = (params - target).pow(2).sum() / (start - target).pow(2).sum()
            self.image_optimizer.zero_grad()
            self.lr_optimizer.zero_grad()
            loss.backward()
            self.image_optimizer.step()
            self.lr_optimizer.step()


# K = 2 at most: each student's 30-step unroll saves about 14.2 GiB for the backward pass (see
# fastmask.distill.mtt), so 4 students with their temporaries come near an 80 GB H100's memory.
@pytest.mark.parametrize("num_networks", [1, 2])
def bench_mtt_iteration(bench, num_networks):
    ipc, width, syn_steps = SIZES.ipc, SIZES.width, SIZES.mtt_steps
    train = cifar_shaped(bench, 256)
    config = MTTConfig(num_networks=num_networks, syn_steps=syn_steps, expert_epochs=2, max_start_epoch=1,
                       experts=2, expert_train_epochs=3, lr_teacher=0.01)
    ours = TrajectoryMatching(train, ipc, config, model_options={"width": width})
    ours.prepare_experts(progress=False)  # untimed: two experts of 3 epochs to start the students from
    eager = EagerMTT(train, ipc, width, num_networks, syn_steps, ours.buffer, bench.device)
    assert [shape for _, shape in eager.layout] == [shape for _, shape in ours.layout]  # one flat layout
    contenders(bench, f"mtt K={num_networks} ipc={ipc} N={syn_steps} batch={CLASSES * ipc}",
               {"eager": eager.iteration, "fastmask": ours.step},
               unroll_parameters=ours.buffer.num_parameters)


@pytest.mark.parametrize("num_experts", [4])
def bench_mtt_experts_epoch(bench, num_experts):
    width, images = SIZES.width, SIZES.expert_images
    train = cifar_shaped(bench, images // CLASSES)

    def fastmask_epoch():
        buffer = ExpertBuffer(train, None, model="convnet3", model_options={"width": width}, epochs=1)
        buffer.prepare(num_experts, parallel=num_experts, progress=False)

    dsa = DSA(seed=0, device=bench.device)

    def eager_epoch():
        for _ in range(num_experts):
            with torch.device(bench.device):
                net = ConvNet3(train.image_shape[0], width, train.image_shape[1])
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            order = torch.randperm(len(train), device=bench.device)
            for start in range(0, len(train), 256):
                index = order[start:start + 256]
                optimizer.zero_grad()
                F.cross_entropy(net(dsa(train.images[index])), train.labels[index]).backward()
                optimizer.step()
            torch.cat([p.detach().flatten() for p in net.parameters()]).cpu()

    contenders(bench, f"experts K={num_experts} epoch of {len(train)} images",
               {"eager": eager_epoch, "fastmask": fastmask_epoch},
               batches_per_epoch=math.ceil(len(train) / 256))
