"""Masked linear, forward + backward, at the layer shapes of the ConvNet-3 head (2048 -> 10 on
CIFAR) and LeNet-300-100 (784 -> 300 -> 100 -> 10), batch 256, bf16 and fp32, 20% density.

Contenders, each computing the output and the gradients of the input (except at a first layer,
whose input is the data) and of the weight:
- ``prune``: an ``nn.Linear`` reparametrised by ``torch.nn.utils.prune.custom_from_mask`` (the baseline);
- ``masked_weight``: ``F.linear(x, w * m)``; ``masked_weight_compiled``: ``torch.compile`` of it;
- ``fastmask``: ``fastmask.ops.masked_linear`` through its per-shape dispatch (Triton or cuBLAS);
- ``fastmask_triton``: the Triton kernels alone (``FASTMASK_BACKEND=triton``).
And K = 4 models at once on the LeNet-300-100 shapes: ``fastmask.ops.stacked_masked_linear``
against 4 sequential ``F.linear(x[k], w[k] * m[k])`` (eager and compiled).

Targets (issue 3, as for conv): fastmask >= 1.3x ``prune``, >= 1.0x ``masked_weight``; stacked
K=4 >= 2x the sequential calls. These layers are small: the roofline is
max(FLOPs / measured matmul rate, bytes / measured HBM bandwidth) and launch latency dominates.
fp32 here is true fp32 (``torch.backends.cuda.matmul.allow_tf32`` as set, False by default).

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

from bench.reference import models

BATCH = 256
DENSITY = 0.2
STACK = 4
SMOKE = not torch.cuda.is_available()
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


def _convnet_head() -> LinearShape:
    head = next(layer for layer in models.layer_shapes(models.create("convnet3", 10, (3, 32, 32)), (3, 32, 32))
                if isinstance(layer["module"], nn.Linear))
    return LinearShape("convnet3", head["name"], head["module"].in_features, head["module"].out_features, False)


LENET = [LinearShape("lenet300_100", f"fc{i + 1}", a, b, i == 0) for i, (a, b) in enumerate([(784, 300), (300, 100),
                                                                                             (100, 10)])]
SHAPES = [_convnet_head(), *LENET]
LAYER_CASES = [(SHAPES[0], "fp32"), (LENET[0], "bf16")] if SMOKE else [(s, d) for s in SHAPES for d in DTYPES]
STACK_CASES = [(LENET[1], "fp32")] if SMOKE else [(s, d) for s in LENET for d in DTYPES]


def _case_id(case) -> str:
    shape, dtype = case
    return f"{shape.model}-{shape.layer}-{dtype}"


def linear_work(shape: LinearShape, batch: int, models_: int, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs, bytes) of forward, grad-weight and (past a first layer) grad-input for ``models_`` models."""
    passes = 2 if shape.first_layer else 3
    x, w, y = batch * shape.in_features, shape.in_features * shape.out_features, batch * shape.out_features
    element = torch.finfo(dtype).bits // 8
    return (models_ * 2.0 * batch * shape.in_features * shape.out_features * passes,
            models_ * (passes * (x + w + y) * element + passes * w))  # + one mask byte a pass


def roofline_ms(roofline, dtype: torch.dtype, flops: float, bytes_moved: float) -> float:
    rate = roofline["matmul_flops"].get(str(dtype).removeprefix("torch."), float("nan"))
    return max(flops / rate, bytes_moved / roofline["hbm_bytes_per_s"]) * 1e3


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


def _normwise_difference(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def masked_weight_forward(x, w, mask, b):
    return F.linear(x, w * mask, b)


@pytest.mark.parametrize("case", LAYER_CASES, ids=_case_id)
def bench_masked_linear(bench, roofline, monkeypatch, case):
    full, dtype_name = case
    shape = full.smoke() if bench.smoke else full
    batch = 2 if bench.smoke else BATCH
    dtype = DTYPES[dtype_name]
    x, w, m, b, grad_y = _tensors(shape, batch, dtype, bench.device)
    float_mask = m.to(dtype)
    pruned = nn.Linear(shape.in_features, shape.out_features).to(bench.device, dtype)
    with torch.no_grad():
        pruned.weight.copy_(w)
        pruned.bias.copy_(b)
    prune.custom_from_mask(pruned, "weight", m)
    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    contenders = {
        "prune": lambda: _grads(pruned(x), [x, pruned.weight_orig], grad_y),
        "masked_weight": lambda: _grads(masked_weight_forward(x, w, float_mask, b), [x, w], grad_y),
        "masked_weight_compiled": lambda: _grads(compiled_forward(x, w, float_mask, b), [x, w], grad_y),
        "fastmask": lambda: _grads(ops.masked_linear(x, w, m, b), [x, w], grad_y),
    }
    if bench.smoke and case != LAYER_CASES[0]:  # torch.compile takes seconds per shape on the CPU: check it once
        del contenders["masked_weight_compiled"]
    times = {name: bench.time(fn) for name, fn in contenders.items()}
    with monkeypatch.context() as patch:  # the Triton kernels alone, past the dispatch
        patch.setenv("FASTMASK_BACKEND", "triton")
        times["fastmask_triton"] = bench.time(lambda: _grads(ops.masked_linear(x, w, m, b), [x, w], grad_y))
        triton_out = ops.masked_linear(x, w, m, b).detach()
    with torch.no_grad():
        expected = masked_weight_forward(x, w, float_mask, b)
        difference = {"fastmask": _normwise_difference(ops.masked_linear(x, w, m, b), expected),
                      "fastmask_triton": _normwise_difference(triton_out, expected)}
    flops, bytes_moved = linear_work(shape, batch, 1, dtype)
    bound = roofline_ms(roofline, dtype, flops, bytes_moved)
    extra = {f"speedup_vs_{name}": times[name] / times["fastmask"]
             for name in ("masked_weight", "masked_weight_compiled") if name in times}
    bench.row(shape.describe(batch, dtype_name), times, baseline="prune", **extra, roofline_ms=bound,
              roofline_fraction={name: bound / times[name] for name in ("fastmask", "fastmask_triton")},
              flops=flops, bytes_moved=bytes_moved, density=DENSITY, max_normwise_difference=difference)
    assert all(d < 2e-2 for d in difference.values()), difference


@pytest.mark.parametrize("case", STACK_CASES, ids=_case_id)
def bench_stacked_masked_linear(bench, roofline, monkeypatch, case):
    full, dtype_name = case
    shape = full.smoke() if bench.smoke else full
    batch = 2 if bench.smoke else BATCH
    dtype = DTYPES[dtype_name]
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
    if bench.smoke:
        del contenders["sequential_compiled"]  # checked once by bench_masked_linear
    times = {name: bench.time(fn) for name, fn in contenders.items()}
    with monkeypatch.context() as patch:
        patch.setenv("FASTMASK_BACKEND", "triton")
        times["fastmask_stacked_triton"] = bench.time(stacked)
    flops, bytes_moved = linear_work(shape, batch, STACK, dtype)
    bound = roofline_ms(roofline, dtype, flops, bytes_moved)
    extra = {"speedup_vs_sequential_compiled": times["sequential_compiled"] / times["fastmask_stacked"]} \
        if "sequential_compiled" in times else {}
    bench.row(f"K={STACK} {shape.describe(batch, dtype_name)}", times, baseline="sequential", **extra,
              roofline_ms=bound, roofline_fraction={"fastmask_stacked": bound / times["fastmask_stacked"]}, flops=flops,
              bytes_moved=bytes_moved, density=DENSITY)
