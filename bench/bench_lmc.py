"""Linear mode connectivity: 30 alphas between two masked networks (20% density), the loss and
error at each over a test set, with and without BatchNorm reset (statistics recomputed from the
training set per alpha); and a loss-landscape plane (ConvNet-3).

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
  device-resident dataset, as shipped: on a GPU all alphas in one pass, the interpolated weights
  formed in the kernels; on the CPU one alpha at a time (``fastmask.combinations``'
  ``ONE_AT_A_TIME_DEVICES``). A fall-back to one alpha at a time because the
  models do not stack (``lmc.StackFallbackWarning``) fails the case;
- ``fastmask_stacked``: the same with all alphas in one stacked pass (``chunk`` given), to check
  the CPU's choice;
- ``forward_floor``: not an LMC: one plain network's forward passes over the data, once per alpha
  (its reset passes too), with nothing else (no interpolation, no loss). What any evaluation of one
  network per alpha costs at least on the device: only work shared across the alphas (a batched
  pass) or fewer passes over memory (fused, compiled kernels) can beat it.

Cases: on a GPU 10,000 CIFAR-shaped images (3 x 32 x 32), ConvNet-3 (instance norm, and batch
norm with and without reset) and ResNet-18 (with and without reset), batches of 1000, a 21 x 21
plane; headline (``make gpu-session``): ConvNet-3 without reset. On the CPU the digits test set
(360 images of 1 x 8 x 8; the training set for the reset) with ConvNet-3 width 128 (headline)
and with batch norm and reset, 1000 Fashion-MNIST-shaped images (1 x 28 x 28) with ResNet-10
width 16, an 11 x 11 plane on digits. Each contender is one whole evaluation, timed as a whole run.
Targets (issue 9): >= 10x vs ``loop``, >= 1.5x vs ``vmap_compiled``.

Run: .venv/bin/python -m pytest bench/bench_lmc.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset

from fastmask import data, landscape, lmc, models
from fastmask.nn import is_masked, to_torch_prune

from bench.harness import case, cases

DENSITY = 0.2


@dataclasses.dataclass(frozen=True)
class LMCCase:
    arch: str
    options: tuple = ()  # model options as (name, value) pairs
    reset: bool = False  # BatchNorm statistics recomputed per alpha
    data: str = "synthetic"  # "digits" (the real test set), or "synthetic" of `shape`
    shape: tuple = (3, 32, 32)
    images: int = 10_000
    alphas: int = 30
    batch: int = 1000
    grid: tuple = (21, 21)  # the plane's
    smoke_compiled: bool = False

    def describe(self) -> str:
        options = "".join(f" {key}={value}" for key, value in self.options)
        where = "digits" if self.data == "digits" else f"images={self.images} {self.shape[1]}x{self.shape[2]}"
        return f"{self.arch}{options}{' bn-reset' if self.reset else ''} alphas={self.alphas} {where}"

    def case_id(self) -> str:
        norm = "-bn" if ("norm", "batch") in self.options else ""
        where = "digits" if self.data == "digits" else f"{self.shape[1]}px"
        return f"{self.arch}{norm}{'-reset' if self.reset else ''}-{where}"


BATCH_NORM = (("norm", "batch"),)
GPU = [LMCCase("convnet3"), LMCCase("convnet3", BATCH_NORM), LMCCase("convnet3", BATCH_NORM, reset=True),
       LMCCase("resnet18"), LMCCase("resnet18", reset=True)]
DIGITS = LMCCase("convnet3", data="digits", shape=(1, 8, 8), grid=(11, 11))
CPU = [DIGITS, dataclasses.replace(DIGITS, options=BATCH_NORM, reset=True),
       LMCCase("resnet10", (("width", 16),), shape=(1, 28, 28), images=1000, batch=250)]
SMOKE = [LMCCase("convnet3", (("width", 8),), shape=(3, 8, 8), images=48, alphas=3, batch=16, grid=(3, 3)),
         LMCCase("convnet3", (("width", 8), ("norm", "batch")), reset=True, shape=(3, 8, 8), images=48, alphas=3,
                 batch=16, smoke_compiled=True)]


def _table(items, headline=None):
    return [case(c.case_id(), c, headline=c is headline) for c in items]


CASES = cases(gpu=_table(GPU, GPU[0]), cpu=_table(CPU, CPU[0]), smoke=_table(SMOKE, SMOKE[0]))
PLANE_CASES = cases(gpu=_table(GPU[:1]), cpu=_table(CPU[:1]), smoke=_table(SMOKE[:1]))


def masked_models(name, options, shape, seeds, device):
    """Models of one random mask (as the copies of an LMC experiment), different weights per seed."""
    built = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.create(name, 10, shape, **options)
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


def splits_for(bench, c: LMCCase):
    if c.data == "digits":
        return data.load("digits", device=bench.device)
    return data.load("synthetic", device=bench.device, shape=c.shape, train_size=c.images, test_size=c.images)


def worst_difference(results, reference):
    return max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-12) for a, b in zip(results, reference))


def batches_of(dataset, size):
    return [(dataset.images[i:i + size], dataset.labels[i:i + size]) for i in range(0, len(dataset), size)]


def loader_of(dataset, size, device):
    return DataLoader(TensorDataset(dataset.images.cpu(), dataset.labels.cpu()), batch_size=size,
                      pin_memory=device.type == "cuda")


def batched_only(fn):
    """``fn`` with lmc's fall-back to one alpha at a time made an error: the contender is the batched path."""
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("error", lmc.StackFallbackWarning)
            return fn()

    return run


@pytest.mark.parametrize("c", CASES)
def bench_lmc_interpolate(bench, c):
    device = bench.device
    splits = splits_for(bench, c)
    model_a, model_b = masked_models(c.arch, dict(c.options), splits.train.image_shape, (1, 2), device)
    plain_a, plain_b = plain_copy(model_a), plain_copy(model_b)
    alphas = lmc.alpha_grid(c.alphas)
    loader = loader_of(splits.test, c.batch, device)
    reset_loader = loader_of(splits.train, c.batch, device) if c.reset else None
    batches = batches_of(splits.test, c.batch)
    reset_batches = batches_of(splits.train, c.batch) if c.reset else None
    vmapped = VmapLMC(plain_a, plain_b, alphas)

    def loop():
        return loop_lmc(plain_a, plain_b, alphas, loader, reset_loader, device)

    def vmap_compiled():
        return vmapped(batches, reset_batches)

    @batched_only
    def fastmask():
        result = lmc.interpolate(model_a, model_b, alphas, splits.test, bn_reset_data=splits.train if c.reset else None,
                                 batch_size=c.batch)
        return list(zip(result.loss, result.error))

    @batched_only
    def fastmask_stacked():  # a chunk given keeps the stack where the CPU takes one alpha at a time
        result = lmc.interpolate(model_a, model_b, alphas, splits.test, bn_reset_data=splits.train if c.reset else None,
                                 batch_size=c.batch, chunk=len(alphas))
        return list(zip(result.loss, result.error))

    floor_net = copy.deepcopy(plain_a)  # its own copy: the reset passes change its statistics

    def forward_floor():
        with torch.no_grad():
            for _ in alphas:
                floor_net.train()
                for x, _ in reset_batches or ():
                    floor_net(x)
                floor_net.eval()
                for x, _ in batches:
                    floor_net(x)

    contenders = {"loop": loop, "vmap_compiled": vmap_compiled, "fastmask": fastmask,
                  "fastmask_stacked": fastmask_stacked, "forward_floor": forward_floor}
    times = bench.measure(contenders, compiled=["vmap_compiled"], whole_runs=True, smoke_compiled=c.smoke_compiled)
    reference = loop()
    evaluations = [name for name in times if name not in ("loop", "forward_floor")]
    agreement = {name: worst_difference(contenders[name](), reference) for name in evaluations}
    extra = {f"speedup_vs_{name}": bench.speedup(times, "fastmask", name)
             for name in ("vmap_compiled", "forward_floor") if name in times}
    if bench.kind == "gpu":
        extra["peak_memory_bytes"] = {name: bench.peak_memory(contenders[name]) for name in evaluations}
    bench.row(c.describe(), times, baseline="loop", **extra,
              max_relative_loss_difference=agreement, parameters=sum(p.numel() for p in model_a.parameters()),
              density=DENSITY)
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


@pytest.mark.parametrize("c", PLANE_CASES)
def bench_landscape_plane(bench, c):
    device = bench.device
    splits = splits_for(bench, c)
    w0, w1, w2 = masked_models(c.arch, dict(c.options), splits.train.image_shape, (0, 1, 2), device)
    plain = [plain_copy(w) for w in (w0, w1, w2)]
    loader = loader_of(splits.test, c.batch, device)

    def loop():
        return loop_plane(*plain, c.grid, 0.2, loader, device)

    @batched_only
    def fastmask():
        return landscape.plane(w0, w1, w2, splits.test, grid=c.grid, batch_size=c.batch).loss.flatten().tolist()

    times = bench.measure({"loop": loop, "fastmask": fastmask}, whole_runs=True)
    difference = max(abs(a - b) / abs(b) for a, b in zip(fastmask(), loop()))
    bench.row(f"{c.arch} plane {c.grid[0]}x{c.grid[1]} {c.describe().rsplit(' ', 1)[-1]}", times, baseline="loop",
              max_relative_loss_difference=difference, density=DENSITY)
    assert difference < 1e-2, difference
