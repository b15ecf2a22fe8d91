"""Masked conv2d, forward + backward, at the conv layer shapes of ConvNet-3 and ResNet-18, 20% density.

Contenders, each computing the output and the gradients of the input (except at a first layer,
whose input is the image) and of the weight:
- ``prune``: an ``nn.Conv2d`` reparametrised by ``torch.nn.utils.prune.custom_from_mask`` (the
  baseline: what the papers' code runs);
- ``masked_weight``: ``F.conv2d(x, w * m)``; ``masked_weight_compiled``: ``torch.compile`` of it;
- ``fastmask``: ``fastmask.ops.masked_conv2d`` through its per-shape dispatch (on a GPU the Triton
  kernel or cuDNN on the pre-masked weight, whichever was faster on the first call; on the CPU
  the torch reference, ``F.conv2d`` on ``w * m``);
- ``fastmask_triton`` (GPU): the Triton kernels alone (``FASTMASK_BACKEND=triton``).
And K = 4 models at once: ``fastmask.ops.stacked_masked_conv2d`` against 4 sequential
``F.conv2d(x[k], w[k] * m[k])`` (eager and compiled), with one batch per model or one shared batch.

Cases: on a GPU every conv shape of ConvNet-3 and CIFAR ResNet-18 (32 x 32 inputs) and ConvNet-3's
128 -> 128 conv at 32 x 32, batch 256, bf16 and fp32 (TF32, cuDNN's default, which fastmask
follows), K = 4 on the ConvNet-3 shapes; headline (``make gpu-session``): ConvNet-3 128 -> 128 at
32 x 32, ResNet-18 64 -> 64 at 32 x 32 and 256 -> 256 at 8 x 8, both dtypes, and K = 4 at the
first. On the CPU, float32: ConvNet-3 width 128 on digits (1 x 8 x 8, batch 64) and on
Fashion-MNIST-shaped images (1 x 28 x 28, batch 32), four shapes of ResNet-18 width 16 on the latter.

Targets (issue 3): fastmask >= 1.3x ``prune`` and >= 1.0x ``masked_weight`` at every shape;
stacked K=4 >= 2x the 4 sequential calls. Roofline (GPU): max(FLOPs / measured matmul rate of the
dtype, bytes / measured HBM bandwidth), fp32 at the TF32 rate measured here.

Run: .venv/bin/python -m pytest bench/bench_masked_conv.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import dataclasses
import os

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
    first_layer: bool  # its input is the image: no gradient wanted

    def smoke(self) -> "ConvShape":
        """The same layer, tiny (for the interpreter and the CPU)."""
        return dataclasses.replace(self, in_channels=min(self.in_channels, 3 if self.first_layer else 4),
                                   out_channels=min(self.out_channels, 4), size=min(self.size, 6))

    def describe(self, batch: int, dtype: str) -> str:
        return (f"{self.model} {self.layer} {self.in_channels}->{self.out_channels} k{self.kernel} s{self.stride} "
                f"{self.size}x{self.size} batch={batch} {dtype}")


@dataclasses.dataclass(frozen=True)
class ConvCase:
    shape: ConvShape
    dtype: str
    batch: int
    shared_input: bool = False  # stacked cases: one batch seen by all K models
    smoke_compiled: bool = False


def conv_shapes(name: str, in_shape=(3, 32, 32), **options) -> list[ConvShape]:
    """The distinct conv layer shapes of model ``name`` on ``in_shape`` inputs, in call order."""
    shapes, seen = [], set()
    model = models.create(name, 10, in_shape, **options)
    described = name + "".join(f"-{key}{value}" for key, value in options.items())
    convs = [layer for layer in models.layer_shapes(model, in_shape) if isinstance(layer["module"], nn.Conv2d)]
    for index, layer in enumerate(convs):
        m = layer["module"]
        shape = ConvShape(described, layer["name"], m.in_channels, m.out_channels, layer["input_shape"][-1],
                          m.kernel_size[0], m.stride[0], m.padding[0], m.bias is not None, index == 0)
        key = dataclasses.replace(shape, layer="")
        if key not in seen:
            seen.add(key)
            shapes.append(shape)
    return shapes


def _id(c: ConvCase) -> str:
    return f"{c.shape.model}-{c.shape.layer}-{c.shape.in_channels}x{c.shape.size}-{c.dtype}" + \
        ("-shared" if c.shared_input else "")


def _table(items, headline=()):
    return [case(_id(c), c, headline=c in headline) for c in items]


BATCH = 256
CONVNET, RESNET = conv_shapes("convnet3"), conv_shapes("resnet18")
# ConvNet-3's 128 -> 128 layer at the 32 x 32 of a CIFAR image (in the network it sees 16 x 16 and 8 x 8).
CONVNET_32 = dataclasses.replace(CONVNET[1], layer="features.4-at-32x32", size=32)
RESNET_64, RESNET_256 = (next(s for s in RESNET if (s.in_channels, s.size, s.stride) == key)
                         for key in ((64, 32, 1), (256, 8, 1)))
GPU_LAYERS = [ConvCase(s, d, BATCH) for s in [CONVNET_32] + CONVNET + RESNET for d in DTYPES]
GPU_HEADLINE = [ConvCase(s, d, BATCH) for s in (CONVNET_32, RESNET_64, RESNET_256) for d in DTYPES]
GPU_STACKS = [ConvCase(s, d, BATCH) for s in [CONVNET_32] + CONVNET for d in DTYPES]
DIGITS, FASHION = conv_shapes("convnet3", (1, 8, 8)), conv_shapes("convnet3", (1, 28, 28))
FASHION_RESNET = [s for s in conv_shapes("resnet18", (1, 28, 28), width=16)
                  if (s.in_channels, s.out_channels, s.kernel) in ((16, 16, 3), (16, 32, 3), (32, 64, 3), (64, 64, 3))]
CPU_LAYERS = ([ConvCase(s, "fp32", 64) for s in DIGITS] + [ConvCase(s, "fp32", 32) for s in FASHION[:2]]
              + [ConvCase(s, "fp32", 32) for s in FASHION_RESNET])
CPU_STACKS = [ConvCase(DIGITS[1], "fp32", 64), ConvCase(DIGITS[0], "fp32", 64, shared_input=True),
              ConvCase(FASHION[1], "fp32", 32)]
# torch.compile is checked once, on a case outside the headline (the dry run of make gpu-session skips it).
SMOKE_HEADLINE = [ConvCase(c.shape.smoke(), c.dtype, 2) for c in GPU_HEADLINE]
SMOKE_LAYERS = SMOKE_HEADLINE + [ConvCase(CONVNET[0].smoke(), "fp32", 2, smoke_compiled=True)]
SMOKE_STACKS = [ConvCase(CONVNET_32.smoke(), d, 2) for d in DTYPES] + [ConvCase(DIGITS[0].smoke(), "fp32", 2,
                                                                                shared_input=True)]

LAYER_CASES = cases(gpu=_table(GPU_LAYERS, GPU_HEADLINE), cpu=_table(CPU_LAYERS, CPU_LAYERS),
                    smoke=_table(SMOKE_LAYERS, SMOKE_HEADLINE))
STACK_CASES = cases(gpu=_table(GPU_STACKS, GPU_STACKS[:2]), cpu=_table(CPU_STACKS, CPU_STACKS),
                    smoke=_table(SMOKE_STACKS, SMOKE_STACKS[:2]))


@pytest.fixture(scope="module")
def tf32_matmul_flops(roofline):
    """The TF32 matmul rate of this GPU (FLOP/s), measured like the roofline fixture's rates."""
    if roofline is None:
        return None
    import triton.testing

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        a = torch.randn(8192, 8192, device="cuda")
        ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * 8192**3 / (ms * 1e-3)


def conv_rate(roofline, tf32_flops, dtype: torch.dtype) -> float:
    """The matmul rate a conv of ``dtype`` can reach: TF32's for float32 when cuDNN may use it."""
    return tf32_flops if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else matmul_rate(roofline, dtype)


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


def _tensors(shape: ConvShape, batch: int, dtype: torch.dtype, device, generator, lead=(), input_lead=None):
    input_lead = lead if input_lead is None else input_lead
    x = torch.randn(*input_lead, batch, shape.in_channels, shape.size, shape.size, generator=generator)
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


def _autotune(bench) -> str:
    """The autotune mode in the case's text where kernels run (so that make gpu-session's run with
    the full list is a row of its own); nothing on the CPU, whose rows time no kernel."""
    return f" autotune={os.environ.get('FASTMASK_AUTOTUNE', 'full')}" if bench.kernels else ""


@pytest.mark.parametrize("c", LAYER_CASES)
def bench_masked_conv2d(bench, roofline, tf32_matmul_flops, c):
    shape, batch, dtype = c.shape, c.batch, DTYPES[c.dtype]
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

    def fastmask():
        return _grads(ops.masked_conv2d(x, w, m, b, *conv_args), [x, w], grad_y)

    def forward():
        return ops.masked_conv2d(x, w, m, b, *conv_args).detach()

    with torch.no_grad():
        expected = masked_weight_forward(x, w, float_mask, b)
    times, difference = time_masked_layer(bench, {
        "prune": lambda: _grads(pruned(x), pruned_inputs, grad_y),
        "masked_weight": lambda: _grads(masked_weight_forward(x, w, float_mask, b), [x, w], grad_y),
        "masked_weight_compiled": lambda: _grads(compiled_forward(x, w, float_mask, b), [x, w], grad_y),
    }, fastmask, forward, expected, c.smoke_compiled)

    flops, bytes_moved = conv_work(shape, batch, 1, dtype)
    extra = {f"speedup_vs_{name}": bench.speedup(times, "fastmask", name)
             for name in ("masked_weight", "masked_weight_compiled") if name in times}
    roof = roofline_fields(roofline, conv_rate(roofline, tf32_matmul_flops, dtype), flops, bytes_moved, medians(times),
                           [name for name in ("fastmask", "fastmask_triton") if name in times])
    tf32 = " tf32" if torch.backends.cudnn.allow_tf32 and dtype == torch.float32 and bench.kind == "gpu" else ""
    bench.row(f"{shape.describe(batch, c.dtype)}{tf32}{_autotune(bench)}", times, baseline="prune", **extra, **roof,
              density=DENSITY, max_normwise_difference=difference)
    assert all(d < 2e-2 for d in difference.values()), difference


@pytest.mark.parametrize("c", STACK_CASES)
def bench_stacked_masked_conv2d(bench, roofline, tf32_matmul_flops, c):
    shape, batch, dtype = c.shape, c.batch, DTYPES[c.dtype]
    xs, ws, m, bs = _tensors(shape, batch, dtype, bench.device, torch.Generator().manual_seed(0), lead=(STACK,),
                             input_lead=() if c.shared_input else (STACK,))
    conv_args = (shape.stride, shape.padding)
    y_shape = F.conv2d(xs[0].detach() if not c.shared_input else xs.detach(), ws[0].detach(), None, *conv_args).shape
    grad_y = torch.randn(STACK, *y_shape, generator=torch.Generator().manual_seed(1)).to(bench.device, dtype)
    float_mask = m.to(dtype)
    # The sequential contenders hold each model's tensors as separate leaves, as K separate models do.
    per_model = [(xs if c.shared_input else xs[k].detach().requires_grad_(xs.requires_grad),
                  ws[k].detach().requires_grad_(), float_mask[k], None if bs is None else bs[k]) for k in range(STACK)]

    def masked_weight_forward(x, w, mask, b):
        return F.conv2d(x, w * mask, b, *conv_args)

    compiled_forward = torch.compile(masked_weight_forward, dynamic=False)

    def sequential(forward):
        return [_grads(forward(x, w, mask, b), [x, w], grad_y[k]) for k, (x, w, mask, b) in enumerate(per_model)]

    def stacked():
        return _grads(ops.stacked_masked_conv2d(xs, ws, m, bs, *conv_args), [xs, ws], grad_y)

    contenders = {"sequential": lambda: sequential(masked_weight_forward),
                  "sequential_compiled": lambda: sequential(compiled_forward), "fastmask_stacked": stacked}
    if bench.kernels:
        contenders["fastmask_stacked_triton"] = with_backend("triton", stacked)
    times = bench.measure(contenders, compiled=["sequential_compiled"])
    flops, bytes_moved = conv_work(shape, batch, STACK, dtype)
    extra = {"speedup_vs_sequential_compiled": bench.speedup(times, "fastmask_stacked", "sequential_compiled")} \
        if "sequential_compiled" in times else {}
    roof = roofline_fields(roofline, conv_rate(roofline, tf32_matmul_flops, dtype), flops, bytes_moved, medians(times),
                           ["fastmask_stacked"])
    bench.row(f"K={STACK}{' shared input' if c.shared_input else ''} {shape.describe(batch, c.dtype)}"
              f"{_autotune(bench)}", times, baseline="sequential", **extra, **roof, density=DENSITY)
