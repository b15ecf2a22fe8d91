"""Linear mode connectivity: 30 alphas over 10,000 CIFAR-shaped test images, ConvNet-3 and
ResNet-18 (masked at 20% density), with and without BatchNorm reset (statistics recomputed
from 10,000 training images per alpha); and a 21 x 21 loss-landscape plane (ConvNet-3).

Contenders, each returning the loss and error at every alpha:
- ``loop``: what researchers write: one model (the masked weights as a plain torch model),
  ``load_state_dict`` of the interpolated state per alpha, a ``DataLoader`` pass over CPU
  tensors per alpha (and one over the reset data), ``.item()`` per batch;
- ``vmap_compiled``: the K interpolated parameter sets stacked and ``torch.func.vmap`` over
  ``functional_call`` of the same plain model, under ``torch.compile``, on device-resident
  batches (BatchNorm reset under vmap: batched running statistics, momentum None). The reset
  passes run the vmap uncompiled: BatchNorm's cumulative average reads ``float(num_batches_tracked)``,
  which dynamo cannot trace inside vmap (a graph break that would drop the whole function to eager
  without saying so, capture_scalar_outputs or not: checked with torch 2.13);
- ``fastmask``: ``fastmask.lmc.interpolate`` (``landscape.plane`` for the plane) on a
  device-resident dataset: all alphas in one pass, the interpolated weights formed in the kernels.
Targets (issue 9): >= 10x vs ``loop``, >= 1.5x vs ``vmap_compiled``.

Run: .venv/bin/python -m pytest bench/bench_lmc.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset

from fastmask import data, landscape, lmc, models
from fastmask.nn import is_masked, to_torch_prune

ALPHAS = 30
IMAGES = 10_000
LOOP_BATCH = 1000
GRID = (21, 21)
DENSITY = 0.2

CASES = [("convnet3", {}, False), ("convnet3-bn", {"norm": "batch"}, False), ("convnet3-bn", {"norm": "batch"}, True),
         ("resnet18", {}, False), ("resnet18", {}, True)]


def sizes(bench):
    """(image shape, images, loop batch, alphas, grid): tiny in smoke mode (CPU)."""
    if bench.smoke:
        return (3, 8, 8), 48, 16, 3, (3, 3)
    return (3, 32, 32), IMAGES, LOOP_BATCH, ALPHAS, GRID


def masked_models(name, options, shape, seeds, device):
    """Models of one random mask (as the copies of an LMC experiment), different weights per seed."""
    built = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.create(name.removesuffix("-bn"), 10, shape, **options)
        generator = torch.Generator().manual_seed(0)
        for module in model.modules():
            if is_masked(module):
                module.set_mask(torch.rand(module.weight.shape, generator=generator) < DENSITY)
        built.append(model.to(device).eval())
    return built


def plain_copy(model):
    """The model as researchers hold it: ordinary Conv2d / Linear with the pruned weights zero."""
    plain = to_torch_prune(copy.deepcopy(model))
    for module in plain.modules():
        if hasattr(module, "weight_orig"):  # reparametrised by to_torch_prune
            torch_prune.remove(module, "weight")
    return plain


def loop_lmc(model_a, model_b, alphas, loader, reset_loader, device):
    """The baseline: load_state_dict per alpha, a DataLoader pass per alpha (REPAIR's reset first)."""
    net = copy.deepcopy(model_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    results = []
    for alpha in alphas:
        net.load_state_dict({k: (1 - alpha) * v + alpha * state_b[k] if v.is_floating_point() else v
                             for k, v in state_a.items()})
        if reset_loader is not None:
            for module in net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = None
                    module.reset_running_stats()
            net.train()
            with torch.no_grad():
                for x, _ in reset_loader:
                    net(x.to(device, non_blocking=True))
        net.eval()
        total = correct = count = 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = net(x)
                total += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                count += len(y)
        results.append((total / count, 1 - correct / count))
    return results


class VmapLMC:
    """The K interpolated networks as stacked parameters, vmap over functional_call, compiled."""

    def __init__(self, model_a, model_b, alphas):
        self.net = copy.deepcopy(model_a)
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # cumulative statistics when reset
        self.state_a, self.state_b = model_a.state_dict(), model_b.state_dict()
        self.alphas = torch.tensor(alphas)
        self.param_names = [n for n, _ in self.net.named_parameters()]
        buffer_dims = {n: 0 if b.is_floating_point() else None for n, b in self.net.named_buffers()}

        def forward(params, buffers, x):
            return functional_call(self.net, (params, buffers), (x,))

        self.reset_forward = vmap(forward, in_dims=(0, buffer_dims, None))
        self.forward = torch.compile(self.reset_forward)

    def __call__(self, batches, reset_batches):
        K = len(self.alphas)
        stacked = {}
        for name, a in self.state_a.items():
            if a.is_floating_point():
                alpha = self.alphas.to(a.device, a.dtype).view(-1, *([1] * a.dim()))
                stacked[name] = (1 - alpha) * a + alpha * self.state_b[name]
            else:
                stacked[name] = a.clone()
        params = {n: stacked.pop(n) for n in self.param_names}
        buffers = stacked
        with torch.no_grad():
            if reset_batches is not None:
                for name, b in buffers.items():
                    if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                        b.zero_()
                    elif name.endswith("running_var"):
                        b.fill_(1)
                self.net.train()
                for x, _ in reset_batches:
                    self.reset_forward(params, buffers, x)
            self.net.eval()
            loss = correct = 0
            count = 0
            for x, y in batches:
                logits = self.forward(params, buffers, x)
                loss = loss + F.cross_entropy(logits.flatten(0, 1), y.repeat(K), reduction="none").view(K, -1).sum(1)
                correct = correct + (logits.argmax(-1) == y).sum(1)
                count += len(y)
        return list(zip((loss / count).tolist(), (1 - correct / count).tolist()))


def splits_for(bench, shape, images):
    return data.load("synthetic", device=bench.device, shape=shape, train_size=images, test_size=images)


def worst_difference(results, reference):
    return max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-12) for a, b in zip(results, reference))


@pytest.mark.parametrize("arch, options, reset", CASES, ids=[f"{c[0]}{'-reset' if c[2] else ''}" for c in CASES])
def bench_lmc_interpolate(bench, arch, options, reset):
    shape, images, loop_batch, num_alphas, _ = sizes(bench)
    device = bench.device
    splits = splits_for(bench, shape, images)
    model_a, model_b = masked_models(arch, options, shape, (1, 2), device)
    plain_a, plain_b = plain_copy(model_a), plain_copy(model_b)
    alphas = lmc.alpha_grid(num_alphas)
    pin = device.type == "cuda"
    loader = DataLoader(TensorDataset(splits.test.images.cpu(), splits.test.labels.cpu()), batch_size=loop_batch,
                        pin_memory=pin)
    reset_loader = DataLoader(TensorDataset(splits.train.images.cpu(), splits.train.labels.cpu()),
                              batch_size=loop_batch, pin_memory=pin) if reset else None
    batches = [(splits.test.images[i:i + loop_batch], splits.test.labels[i:i + loop_batch])
               for i in range(0, images, loop_batch)]
    reset_batches = [(splits.train.images[i:i + loop_batch], splits.train.labels[i:i + loop_batch])
                     for i in range(0, images, loop_batch)] if reset else None
    vmapped = VmapLMC(plain_a, plain_b, alphas)

    def loop():
        return loop_lmc(plain_a, plain_b, alphas, loader, reset_loader, device)

    def vmap_compiled():
        return vmapped(batches, reset_batches)

    def fastmask():
        result = lmc.interpolate(model_a, model_b, alphas, splits.test, bn_reset_data=splits.train if reset else None,
                                 batch_size=loop_batch)
        return list(zip(result.loss, result.error))

    reference = loop()
    agreement = {name: worst_difference(fn(), reference) for name, fn in
                 [("vmap_compiled", vmap_compiled), ("fastmask", fastmask)]}
    # Each call takes seconds, and the agreement calls above were the warm-up: one timed call each.
    times = {name: bench.wall_ms(fn) for name, fn in
             [("loop", loop), ("vmap_compiled", vmap_compiled), ("fastmask", fastmask)]}
    peaks = {name: bench.peak_memory(fn) for name, fn in [("vmap_compiled", vmap_compiled), ("fastmask", fastmask)]}
    bench.row(f"{arch}{' bn-reset' if reset else ''} alphas={num_alphas} images={images} {shape[1]}x{shape[2]}",
              times, baseline="loop", speedup_vs_vmap_compiled=times["vmap_compiled"] / times["fastmask"],
              peak_memory_bytes=peaks, max_relative_loss_difference=agreement,
              parameters=sum(p.numel() for p in model_a.parameters()), density=DENSITY)
    assert all(math.isfinite(v) and v < 1e-2 for v in agreement.values()), agreement


def loop_plane(w0, w1, w2, grid, margin, loader, device):
    """The baseline plane: orthonormal coordinates from flat parameter vectors, then one
    vector_to_parameters and one DataLoader pass per grid point."""
    net = copy.deepcopy(w0)
    v0, v1, v2 = (nn.utils.parameters_to_vector(w.parameters()).detach().double() for w in (w0, w1, w2))
    e1 = (v1 - v0) / (v1 - v0).norm()
    along = float((v2 - v0) @ e1)
    e2 = (v2 - v0) - along * e1
    across = float(e2.norm())
    e2 = e2 / across
    xs = [0.0, float((v1 - v0).norm()), along]
    ys = [0.0, 0.0, across]
    pad_x, pad_y = margin * (max(xs) - min(xs)), margin * (max(ys) - min(ys))
    losses = []
    net.eval()
    for y in torch.linspace(min(ys) - pad_y, max(ys) + pad_y, grid[1]).tolist():
        for x in torch.linspace(min(xs) - pad_x, max(xs) + pad_x, grid[0]).tolist():
            nn.utils.vector_to_parameters((v0 + x * e1 + y * e2).float(), net.parameters())
            total = count = 0
            with torch.no_grad():
                for inputs, targets in loader:
                    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                    total += F.cross_entropy(net(inputs), targets, reduction="sum").item()
                    count += len(targets)
            losses.append(total / count)
    return losses


def bench_landscape_plane(bench):
    shape, images, loop_batch, _, grid = sizes(bench)
    device = bench.device
    splits = splits_for(bench, shape, images)
    w0, w1, w2 = masked_models("convnet3", {}, shape, (0, 1, 2), device)
    plain = [plain_copy(w) for w in (w0, w1, w2)]
    loader = DataLoader(TensorDataset(splits.test.images.cpu(), splits.test.labels.cpu()), batch_size=loop_batch,
                        pin_memory=device.type == "cuda")

    def loop():
        return loop_plane(*plain, grid, 0.2, loader, device)

    def fastmask():
        return landscape.plane(w0, w1, w2, splits.test, grid=grid, batch_size=loop_batch).loss.flatten().tolist()

    reference = loop()
    difference = max(abs(a - b) / abs(b) for a, b in zip(fastmask(), reference))
    times = {"loop": bench.wall_ms(loop), "fastmask": bench.wall_ms(fastmask)}  # warmed up by the calls above
    bench.row(f"convnet3 plane {grid[0]}x{grid[1]} images={images} {shape[1]}x{shape[2]}", times, baseline="loop",
              max_relative_loss_difference=difference, density=DENSITY)
    assert difference < 1e-2, difference
