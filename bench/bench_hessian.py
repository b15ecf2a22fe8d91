"""Hutchinson Hessian diagonal: fastmask against the loop researchers write, one Rademacher vector
and one double-backward Hessian-vector product at a time with a host sync per probe, as
PyHessian's ``trace`` does.

Contenders, each giving the diagonal and the per-probe traces:
- ``loop``: the baseline above (the graph of the gradient built once, one double backward per probe);
- ``fastmask``: ``hessian_diag`` as shipped (the products as ``_MeanLossHessian`` chooses them:
  double backward per probe on the CPU for all but small models, vmap over forward-over-reverse
  on a GPU; on a GPU ``probe_batch``
  chosen to fit the free memory, whose peak memory is that fill target, about 80% of what was
  free, by design; on the CPU as many probes per batch as fit in 256 MiB);
- ``fastmask_probe_batch_8`` (GPU): the same with 8 probes per batch, whose peak memory says what
  the batched products cost;
- ``fastmask_vmap`` and ``fastmask_double_backward``: the same with the products formed one way
  on every device (``_MeanLossHessian``), to check the choice of the way;
- ``product_floor``: not an estimate: the gradient's graph built once and one double backward per
  probe with one fixed vector, nothing else (no probes drawn, nothing summed, no host sync). What
  one product per probe costs at least on the device: only work shared across the probes (a
  batched product) or fewer passes over memory (fused kernels) can beat it.
torch.compile of the loop is not a contender: compiled graphs do not support double backward.

Cases: on a GPU 64 probes over a batch of 256 CIFAR-shaped images, ConvNet-3 (instance norm, the
distillation standard; headline) and CIFAR ResNet-18 (batch norm, in eval mode); on the CPU 32
probes over 256 digits images (1 x 8 x 8) with ConvNet-3 width 128 at 20% density (headline), and
16 probes over 64 Fashion-MNIST-shaped images (1 x 28 x 28) with ResNet-10 width 16. The models
are fastmask.models' with their masks: the loop runs them through the masked ops as a user would,
fastmask through torch.func (where the masked ops use plain torch). Each contender is one whole
estimate, timed as a whole run.

Run: .venv/bin/python -m pytest bench/bench_hessian.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastmask import data, hessian, models
from fastmask.hessian import hessian_diag
from fastmask.nn import is_masked

from bench.harness import case, cases

CLASSES = 10
DENSITY = 0.2


@dataclasses.dataclass(frozen=True)
class HessianCase:
    arch: str
    options: tuple = ()  # model options as (name, value) pairs
    data: str = "synthetic"  # "digits" (the real training set) or "synthetic" of `shape`
    shape: tuple = (3, 32, 32)
    batch: int = 256
    probes: int = 64
    density: float = 1.0  # of a random mask on every masked layer

    def describe(self) -> str:
        options = "".join(f" {key}={value}" for key, value in self.options)
        where = "digits" if self.data == "digits" else f"{self.shape[1]}x{self.shape[2]}"
        return f"{self.arch}{options} density={self.density} batch={self.batch} probes={self.probes} {where}"


GPU = [HessianCase("convnet3"), HessianCase("resnet18")]
CPU = [HessianCase("convnet3", data="digits", shape=(1, 8, 8), probes=32, density=DENSITY),
       HessianCase("resnet10", (("width", 16),), shape=(1, 28, 28), batch=64, probes=16, density=DENSITY)]
SMOKE = [HessianCase("convnet3", (("width", 8),), shape=(3, 8, 8), batch=2, probes=4),
         HessianCase("resnet18", (("width", 8),), shape=(3, 8, 8), batch=2, probes=4)]


def _table(items):
    return [case(f"{c.arch}-{c.data if c.data == 'digits' else c.shape[1]}", c, headline=c is items[0]) for c in items]


CASES = cases(gpu=_table(GPU), cpu=_table(CPU), smoke=_table(SMOKE))


def one_probe_at_a_time(model, x, y, num_probes, seed=0):
    """The baseline: diag and per-probe traces from one double-backward product per probe."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    diag = [torch.zeros_like(p) for p in params]
    traces = []
    for _ in range(num_probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype) * 2 - 1
             for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        products = [vi * hvi for vi, hvi in zip(v, hv)]
        for d, product in zip(diag, products):
            d.add_(product)
        traces.append(sum(product.sum() for product in products).item())
    return [d / num_probes for d in diag], traces


def product_floor(model, x, y, num_probes):
    """The least a product per probe costs: one gradient graph, then ``num_probes`` double
    backwards of one fixed vector (model in eval mode)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    vector = [torch.ones_like(p) for p in params]
    for _ in range(num_probes):
        torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)


def model_and_batch(c: HessianCase, device):
    torch.manual_seed(0)
    if c.data == "digits":
        train = data.load("digits", device=device).train
        x, y = train.images[:c.batch], train.labels[:c.batch]
    else:
        x = torch.randn(c.batch, *c.shape, device=device)
        y = torch.randint(0, CLASSES, (c.batch,), device=device)
    model = models.create(c.arch, CLASSES, c.shape, **dict(c.options)).to(device)
    if c.density < 1:
        generator = torch.Generator().manual_seed(0)
        for module in model.modules():
            if is_masked(module):
                module.set_mask((torch.rand(module.weight.shape, generator=generator) < c.density).to(device))
    return model, x, y


def with_modes(modes, fn):
    """``fn`` with the Hessian-vector products formed only by ``modes`` (``_MeanLossHessian``),
    whatever the device and size: to time the way not chosen against the one chosen."""
    def run():
        saved = hessian._MeanLossHessian.VMAP_MODES, hessian._MeanLossHessian.DOUBLE_BACKWARD_MODES
        hessian._MeanLossHessian.VMAP_MODES = hessian._MeanLossHessian.DOUBLE_BACKWARD_MODES = modes
        try:
            return fn()
        finally:
            hessian._MeanLossHessian.VMAP_MODES, hessian._MeanLossHessian.DOUBLE_BACKWARD_MODES = saved

    return run


@pytest.mark.parametrize("c", CASES)
def bench_hessian_diag(bench, c):
    model, x, y = model_and_batch(c, bench.device)
    batches = [(x, y)]

    def fastmask():
        return hessian_diag(model, F.cross_entropy, batches, num_probes=c.probes, seed=0)

    contenders = {"loop": lambda: one_probe_at_a_time(model, x, y, c.probes), "fastmask": fastmask,
                  "fastmask_vmap": with_modes(("forward-over-reverse",), fastmask),
                  "fastmask_double_backward": with_modes(("double-backward",), fastmask),
                  "product_floor": lambda: product_floor(model, x, y, c.probes)}
    if bench.kind != "cpu":  # what a batch of 8 probes costs in memory: a GPU's question
        contenders["fastmask_probe_batch_8"] = lambda: hessian_diag(model, F.cross_entropy, batches,
                                                                    num_probes=c.probes, probe_batch=8, seed=0)
    times = bench.measure(contenders, whole_runs=True)
    extra = {"speedup_vs_product_floor": bench.speedup(times, "fastmask", "product_floor")}
    if bench.kind == "gpu":
        extra["peak_memory_bytes"] = {name: bench.peak_memory(fn) for name, fn in contenders.items()}
        print("peak memory (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in extra["peak_memory_bytes"].items()))
    bench.row(c.describe(), times, baseline="loop", **extra, parameters=sum(p.numel() for p in model.parameters()))
