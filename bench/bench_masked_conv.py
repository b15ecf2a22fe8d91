"""Masked conv2d, forward + backward, at every conv layer shape of ConvNet-3 and CIFAR ResNet-18
(batch 256, 32 x 32 inputs, bf16 and fp32), 20% density.

Contenders, each computing the output and the gradients of the input (except at the first
layer, whose input is the image) and of the weight:
- ``prune``: an ``nn.Conv2d`` reparametrised by ``torch.nn.utils.prune.custom_from_mask`` (the
  baseline: what the papers' code runs);
- ``masked_weight``: ``F.conv2d(x, w * m)``; ``masked_weight_compiled``: ``torch.compile`` of it;
- ``fastmask``: ``fastmask.ops.masked_conv2d`` through its per-shape dispatch (Triton kernel or
  cuDNN on the pre-masked weight, whichever was faster on the first call);
- ``fastmask_triton``: the Triton kernels alone (``FASTMASK_BACKEND=triton``).
And K = 4 models at once on the ConvNet-3 shapes: ``fastmask.ops.stacked_masked_conv2d`` against
4 sequential ``F.conv2d(x[k], w[k] * m[k])`` (eager and compiled).

Targets (issue 3): fastmask >= 1.3x ``prune`` and >= 1.0x ``masked_weight`` at every shape;
stacked K=4 >= 2x the 4 sequential calls. Roofline: max(FLOPs / measured matmul rate of the
dtype, bytes / measured HBM bandwidth); fp32 convolutions run as TF32 (cuDNN's default, which
fastmask follows), so their matmul rate is a TF32 matmul measured here.

Run: .venv/bin/python -m pytest bench/bench_masked_conv.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
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
class ConvShape:
    model: str
    layer: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int
    padding: int
    bias: bool

    @property
    def first_layer(self) -> bool:  # its input is the image: no gradient wanted
        return self.in_channels == 3

    def smoke(self) -> "ConvShape":
        """The same layer, tiny (for the interpreter and the CPU)."""
        return dataclasses.replace(self, in_channels=min(self.in_channels, 3 if self.first_layer else 4),
                                   out_channels=min(self.out_channels, 4), size=min(self.size, 6))

    def describe(self, batch: int, dtype: str) -> str:
        return (f"{self.model} {self.layer} {self.in_channels}->{self.out_channels} k{self.kernel} s{self.stride} "
                f"{self.size}x{self.size} batch={batch} {dtype}")


def conv_shapes(name: str) -> list[ConvShape]:
    """The distinct conv layer shapes of model ``name`` on 32 x 32 CIFAR inputs, in call order."""
    shapes, seen = [], set()
    for layer in models.layer_shapes(models.create(name, 10, (3, 32, 32)), (3, 32, 32)):
        m = layer["module"]
        if not isinstance(m, nn.Conv2d):
            continue
        shape = ConvShape(name, layer["name"], m.in_channels, m.out_channels, layer["input_shape"][-1],
                          m.kernel_size[0], m.stride[0], m.padding[0], m.bias is not None)
        key = dataclasses.replace(shape, layer="")
        if key not in seen:
            seen.add(key)
            shapes.append(shape)
    return shapes


CONVNET, RESNET = conv_shapes("convnet3"), conv_shapes("resnet18")
# Without a GPU: one small case of each kind, to check the code (the Triton kernels in the interpreter).
LAYER_CASES = ([(CONVNET[0], "fp32"), (RESNET[4], "bf16")] if SMOKE
               else [(s, d) for s in CONVNET + RESNET for d in DTYPES])
STACK_CASES = [(CONVNET[1], "fp32")] if SMOKE else [(s, d) for s in CONVNET for d in DTYPES]


def _case_id(case) -> str:
    shape, dtype = case
    return f"{shape.model}-{shape.layer}-{dtype}"


@pytest.fixture(scope="module")
def tf32_matmul_flops():
    """The TF32 matmul rate of this device (FLOP/s), measured like the roofline fixture's rates."""
    if SMOKE:
        return float("nan")
    import triton.testing

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        a = torch.randn(8192, 8192, device="cuda")
        ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * 8192**3 / (ms * 1e-3)


def matmul_rate(roofline, tf32_flops, dtype: torch.dtype) -> float:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return tf32_flops
    return roofline["matmul_flops"].get(str(dtype).removeprefix("torch."), float("nan"))


def roofline_ms(flops: float, bytes_moved: float, rate: float, hbm: float) -> float:
    return max(flops / rate, bytes_moved / hbm) * 1e3


def conv_work(shape: ConvShape, batch: int, models_: int, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs, bytes) of forward, grad-weight and (past the first layer) grad-input for ``models_`` models."""
    out = (shape.size + 2 * shape.padding - shape.kernel) // shape.stride + 1
    x = batch * shape.in_channels * shape.size**2
    w = shape.out_channels * shape.in_channels * shape.kernel**2
    y = batch * shape.out_channels * out**2
    passes = 2 if shape.first_layer else 3
    flops = 2.0 * batch * shape.out_channels * shape.in_channels * shape.kernel**2 * out**2 * passes
    element = torch.finfo(dtype).bits // 8
    return models_ * flops, models_ * (passes * (x + w + y) * element + passes * w)  # + one mask byte a pass


def normwise_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _tensors(shape: ConvShape, batch: int, dtype: torch.dtype, device, generator, lead=()):
    x = torch.randn(*lead, batch, shape.in_channels, shape.size, shape.size, generator=generator)
    w = torch.randn(*lead, shape.out_channels, shape.in_channels, shape.kernel, shape.kernel, generator=generator)
    w = w * (shape.in_channels * shape.kernel**2) ** -0.5
    m = torch.rand(w.shape, generator=generator) < DENSITY
    b = torch.randn(*lead, shape.out_channels, generator=generator) if shape.bias else None
    x, w, b = (None if t is None else t.to(device, dtype) for t in (x, w, b))
    x.requires_grad_(not shape.first_layer)
    w.requires_grad_()
    return x, w, m.to(device), b


def _grads(y, inputs, grad_y):
    return torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad_y)


@pytest.mark.parametrize("case", LAYER_CASES, ids=_case_id)
def bench_masked_conv2d(bench, roofline, tf32_matmul_flops, monkeypatch, case):
    full, dtype_name = case
    shape = full.smoke() if bench.smoke else full
    batch = 2 if bench.smoke else BATCH
    dtype = DTYPES[dtype_name]
    x, w, m, b = _tensors(shape, batch, dtype, bench.device, torch.Generator().manual_seed(0))
    y_shape = F.conv2d(x.detach(), w.detach(), None, shape.stride, shape.padding).shape
    grad_y = torch.randn(y_shape, generator=torch.Generator().manual_seed(1)).to(bench.device, dtype)
    float_mask = m.to(dtype)
    conv_args = (shape.stride, shape.padding)

    pruned = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding,
                       bias=shape.bias).to(bench.device, dtype)
    with torch.no_grad():
        pruned.weight.copy_(w)
        if b is not None:
            pruned.bias.copy_(b)
    prune.custom_from_mask(pruned, "weight", m)
    pruned_inputs = [x, pruned.weight_orig]

    def masked_weight_forward(x, w, mask, b):
        return F.conv2d(x, w * mask, b, *conv_args)

    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    contenders = {
        "prune": lambda: _grads(pruned(x), pruned_inputs, grad_y),
        "masked_weight": lambda: _grads(masked_weight_forward(x, w, float_mask, b), [x, w], grad_y),
        "masked_weight_compiled": lambda: _grads(compiled_forward(x, w, float_mask, b), [x, w], grad_y),
        "fastmask": lambda: _grads(ops.masked_conv2d(x, w, m, b, *conv_args), [x, w], grad_y),
    }
    if bench.smoke and case != LAYER_CASES[0]:  # torch.compile takes seconds per shape on the CPU: check it once
        del contenders["masked_weight_compiled"]
    times = {name: bench.time(fn) for name, fn in contenders.items()}
    with monkeypatch.context() as patch:  # the Triton kernels alone, past the dispatch
        patch.setenv("FASTMASK_BACKEND", "triton")
        times["fastmask_triton"] = bench.time(lambda: _grads(ops.masked_conv2d(x, w, m, b, *conv_args), [x, w], grad_y))
        triton_out = ops.masked_conv2d(x, w, m, b, *conv_args).detach()
    with torch.no_grad():
        expected = masked_weight_forward(x, w, float_mask, b)
        difference = {"fastmask": normwise_difference(ops.masked_conv2d(x, w, m, b, *conv_args), expected),
                      "fastmask_triton": normwise_difference(triton_out, expected)}

    flops, bytes_moved = conv_work(shape, batch, 1, dtype)
    bound = roofline_ms(flops, bytes_moved, matmul_rate(roofline, tf32_matmul_flops, dtype), roofline["hbm_bytes_per_s"])
    extra = {f"speedup_vs_{name}": times[name] / times["fastmask"]
             for name in ("masked_weight", "masked_weight_compiled") if name in times}
    bench.row(shape.describe(batch, dtype_name), times,
              baseline="prune", **extra, roofline_ms=bound,
              roofline_fraction={name: bound / times[name] for name in ("fastmask", "fastmask_triton")},
              flops=flops, bytes_moved=bytes_moved, density=DENSITY, tf32=torch.backends.cudnn.allow_tf32,
              max_normwise_difference=difference)
    assert all(d < 2e-2 for d in difference.values()), difference


@pytest.mark.parametrize("case", STACK_CASES, ids=_case_id)
def bench_stacked_masked_conv2d(bench, roofline, tf32_matmul_flops, monkeypatch, case):
    full, dtype_name = case
    shape = full.smoke() if bench.smoke else full
    batch = 2 if bench.smoke else BATCH
    dtype = DTYPES[dtype_name]
    xs, ws, m, bs = _tensors(shape, batch, dtype, bench.device, torch.Generator().manual_seed(0), lead=(STACK,))
    conv_args = (shape.stride, shape.padding)
    y_shape = F.conv2d(xs[0].detach(), ws[0].detach(), None, *conv_args).shape
    grad_y = torch.randn(STACK, *y_shape, generator=torch.Generator().manual_seed(1)).to(bench.device, dtype)
    float_mask = m.to(dtype)
    # The sequential contenders hold each model's tensors as separate leaves, as K separate models do.
    per_model = [(xs[k].detach().requires_grad_(xs.requires_grad), ws[k].detach().requires_grad_(),
                  float_mask[k], None if bs is None else bs[k]) for k in range(STACK)]

    def masked_weight_forward(x, w, mask, b):
        return F.conv2d(x, w * mask, b, *conv_args)

    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    def sequential(forward):
        return [_grads(forward(x, w, mask, b), [x, w], grad_y[k]) for k, (x, w, mask, b) in enumerate(per_model)]

    def stacked():
        return _grads(ops.stacked_masked_conv2d(xs, ws, m, bs, *conv_args), [xs, ws], grad_y)

    contenders = {"sequential": lambda: sequential(masked_weight_forward),
                  "sequential_compiled": lambda: sequential(compiled_forward), "fastmask_stacked": stacked}
    if bench.smoke:
        del contenders["sequential_compiled"]  # checked once by bench_masked_conv2d
    times = {name: bench.time(fn) for name, fn in contenders.items()}
    with monkeypatch.context() as patch:
        patch.setenv("FASTMASK_BACKEND", "triton")
        times["fastmask_stacked_triton"] = bench.time(stacked)
    flops, bytes_moved = conv_work(shape, batch, STACK, dtype)
    bound = roofline_ms(flops, bytes_moved, matmul_rate(roofline, tf32_matmul_flops, dtype), roofline["hbm_bytes_per_s"])
    extra = {"speedup_vs_sequential_compiled": times["sequential_compiled"] / times["fastmask_stacked"]} \
        if "sequential_compiled" in times else {}
    bench.row(f"K={STACK} {shape.describe(batch, dtype_name)}", times, baseline="sequential", **extra, roofline_ms=bound,
              roofline_fraction={"fastmask_stacked": bound / times["fastmask_stacked"]}, flops=flops,
              bytes_moved=bytes_moved, density=DENSITY)
