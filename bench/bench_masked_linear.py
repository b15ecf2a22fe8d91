"""Masked linear, forward + backward, at the layer shapes of the ConvNet-3 head and LeNet-300-100
(784 -> 300 -> 100 -> 10), 20% density.

Contenders, each computing the output and the gradients of the input (except at a first layer,
whose input is the data) and of the weight:
- ``prune``: an ``nn.Linear`` reparametrised by ``torch.nn.utils.prune.custom_from_mask`` (the baseline);
- ``masked_weight``: ``F.linear(x, w * m)``; ``masked_weight_compiled``: ``torch.compile`` of it;
- ``fastmask``: ``fastmask.ops.masked_linear`` through its per-shape dispatch (Triton or cuBLAS on
  a GPU, the torch reference on the CPU);
- ``fastmask_triton`` (GPU): the Triton kernels alone (``FASTMASK_BACKEND=triton``).
And K = 4 models at once on the LeNet-300-100 shapes: ``fastmask.ops.stacked_masked_linear``
against 4 sequential ``F.linear(x[k], w[k] * m[k])`` (eager and compiled).

Cases: on a GPU batch 256, bf16 and fp32 (true fp32: ``torch.backends.cuda.matmul.allow_tf32`` as
set, False by default), the ConvNet-3 head on CIFAR (2048 -> 10); on the CPU batch 64, float32,
the ConvNet-3 head on digits (128 -> 10). Targets (issue 3, as for conv): fastmask >= 1.3x
``prune``, >= 1.0x ``masked_weight``; stacked K=4 >= 2x the sequential calls. These layers are
small: the roofline (GPU) is max(FLOPs / measured matmul rate, bytes / measured HBM bandwidth) and
launch latency dominates.

Run: .venv/bin/python -m pytest bench/bench_masked_linear.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from fastmask import ops

from bench.harness import (case, cases, matmul_rate, medians, roofline_fields, time_masked_layer,
                           with_backend)
from bench.reference import models

DENSITY = 0.2
STACK = 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class LinearShape:
    model: str
    layer: str
    in_features: int
    out_features: int
    first_layer: bool  # its input is the data: no gradient wanted

    def smoke(self) -> "LinearShape":
        return dataclasses.replace(self, in_features=min(self.in_features, 12), out_features=min(self.out_features, 6))

    def describe(self, batch: int, dtype: str) -> str:
        return f"{self.model} {self.layer} {self.in_features}->{self.out_features} batch={batch} {dtype}"


@dataclasses.dataclass(frozen=True)
class LinearCase:
    shape: LinearShape
    dtype: str
    batch: int
    smoke_compiled: bool = False


def _convnet_head(in_shape) -> LinearShape:
    head = next(layer for layer in models.layer_shapes(models.create("convnet3", 10, in_shape), in_shape)
                if isinstance(layer["module"], nn.Linear))
    return LinearShape("convnet3", head["name"], head["module"].in_features, head["module"].out_features, False)


LENET = [LinearShape("lenet300_100", f"fc{i + 1}", a, b, i == 0) for i, (a, b) in enumerate([(784, 300), (300, 100),
                                                                                             (100, 10)])]
CIFAR_HEAD, DIGITS_HEAD = _convnet_head((3, 32, 32)), _convnet_head((1, 8, 8))


def _table(items):
    return [case(f"{c.shape.model}-{c.shape.layer}-{c.shape.in_features}-{c.dtype}", c) for c in items]


LAYER_CASES = cases(gpu=_table([LinearCase(s, d, 256) for s in [CIFAR_HEAD, *LENET] for d in DTYPES]),
                    cpu=_table([LinearCase(s, "fp32", 64) for s in [DIGITS_HEAD, *LENET]]),
                    smoke=_table([LinearCase(CIFAR_HEAD.smoke(), "fp32", 2, smoke_compiled=True),
                                  LinearCase(LENET[0].smoke(), "bf16", 2)]))
STACK_CASES = cases(gpu=_table([LinearCase(s, d, 256) for s in LENET for d in DTYPES]),
                    cpu=_table([LinearCase(s, "fp32", 64) for s in LENET[:2]]),
                    smoke=_table([LinearCase(LENET[1].smoke(), "fp32", 2)]))


def linear_work(shape: LinearShape, batch: int, models_: int, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs, bytes) of forward, grad-weight and (past a first layer) grad-input for ``models_`` models."""
    passes = 2 if shape.first_layer else 3
    x, w, y = batch * shape.in_features, shape.in_features * shape.out_features, batch * shape.out_features
    element = torch.finfo(dtype).bits // 8
    return (models_ * 2.0 * batch * shape.in_features * shape.out_features * passes,
            models_ * (passes * (x + w + y) * element + passes * w))  # + one mask byte a pass


def _tensors(shape: LinearShape, batch: int, dtype: torch.dtype, device, lead=()):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, batch, shape.in_features, generator=generator)
    w = torch.randn(*lead, shape.out_features, shape.in_features, generator=generator) * shape.in_features**-0.5
    m = torch.rand(w.shape, generator=generator) < DENSITY
    b = torch.randn(*lead, shape.out_features, generator=generator)
    grad_y = torch.randn(*lead, batch, shape.out_features, generator=generator)
    x, w, b, grad_y = (t.to(device, dtype) for t in (x, w, b, grad_y))
    return x.requires_grad_(not shape.first_layer), w.requires_grad_(), m.to(device), b, grad_y


def _grads(y, inputs, grad_y):
    return torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad_y)


def masked_weight_forward(x, w, mask, b):
    return F.linear(x, w * mask, b)


@pytest.mark.parametrize("c", LAYER_CASES)
def bench_masked_linear(bench, roofline, c):
    shape, batch, dtype = c.shape, c.batch, DTYPES[c.dtype]
    x, w, m, b, grad_y = _tensors(shape, batch, dtype, bench.device)
    float_mask = m.to(dtype)
    pruned = nn.Linear(shape.in_features, shape.out_features).to(bench.device, dtype)
    with torch.no_grad():
        pruned.weight.copy_(w)
        pruned.bias.copy_(b)
    prune.custom_from_mask(pruned, "weight", m)
    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    def fastmask():
        return _grads(ops.masked_linear(x, w, m, b), [x, w], grad_y)

    def forward():
        return ops.masked_linear(x, w, m, b).detach()

    with torch.no_grad():
        expected = masked_weight_forward(x, w, float_mask, b)
    times, difference = time_masked_layer(bench, {
        "prune": lambda: _grads(pruned(x), [x, pruned.weight_orig], grad_y),
        "masked_weight": lambda: _grads(masked_weight_forward(x, w, float_mask, b), [x, w], grad_y),
        "masked_weight_compiled": lambda: _grads(compiled_forward(x, w, float_mask, b), [x, w], grad_y),
    }, fastmask, forward, expected, c.smoke_compiled)
    flops, bytes_moved = linear_work(shape, batch, 1, dtype)
    extra = {f"speedup_vs_{name}": bench.speedup(times, "fastmask", name)
             for name in ("masked_weight", "masked_weight_compiled") if name in times}
    roof = roofline_fields(roofline, matmul_rate(roofline, dtype), flops, bytes_moved, medians(times),
                           [name for name in ("fastmask", "fastmask_triton") if name in times])
    bench.row(shape.describe(batch, c.dtype), times, baseline="prune", **extra, **roof, density=DENSITY,
              max_normwise_difference=difference)
    assert all(d < 2e-2 for d in difference.values()), difference


@pytest.mark.parametrize("c", STACK_CASES)
def bench_stacked_masked_linear(bench, roofline, c):
    shape, batch, dtype = c.shape, c.batch, DTYPES[c.dtype]
    xs, ws, m, bs, grad_y = _tensors(shape, batch, dtype, bench.device, lead=(STACK,))
    float_mask = m.to(dtype)
    per_model = [(xs[k].detach().requires_grad_(xs.requires_grad), ws[k].detach().requires_grad_(), float_mask[k], bs[k])
                 for k in range(STACK)]
    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    def sequential(forward):
        return [_grads(forward(x, w, mask, b), [x, w], grad_y[k]) for k, (x, w, mask, b) in enumerate(per_model)]

    def stacked():
        return _grads(ops.stacked_masked_linear(xs, ws, m, bs), [xs, ws], grad_y)

    contenders = {"sequential": lambda: sequential(masked_weight_forward),
                  "sequential_compiled": lambda: sequential(compiled_forward), "fastmask_stacked": stacked}
    if bench.kernels:
        contenders["fastmask_stacked_triton"] = with_backend("triton", stacked)
    times = bench.measure(contenders, compiled=["sequential_compiled"])
    flops, bytes_moved = linear_work(shape, batch, STACK, dtype)
    extra = {"speedup_vs_sequential_compiled": bench.speedup(times, "fastmask_stacked", "sequential_compiled")} \
        if "sequential_compiled" in times else {}
    roof = roofline_fields(roofline, matmul_rate(roofline, dtype), flops, bytes_moved, medians(times),
                           ["fastmask_stacked"])
    bench.row(f"K={STACK} {shape.describe(batch, c.dtype)}", times, baseline="sequential", **extra, **roof,
              density=DENSITY)
