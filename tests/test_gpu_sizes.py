"""The Triton kernels at the sizes the pipeline and the benchmarks run, on a CUDA GPU (skipped
without one): every kernel in fp32 at exact ('ieee') precision, as TF32 and in bf16, against float64
references, with the layouts (NCHW and channels_last, a shared input, unaligned tensors) a real run
meets. The CPU tests run the same kernels only at tiny sizes, in the interpreter.

The bounds are on the largest error relative to the largest reference value (``helpers.rel_error``),
over reductions of up to 262,144 terms (grad-weight over 256 images of 32 x 32): fp32-ieee 1e-4,
TF32 5e-3, bf16 2e-2.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmask import ops
from fastmask.optim import MaskedAdamW, MaskedSGD
from helpers import rel_error

pytestmark = pytest.mark.gpu

PRECISIONS = {"fp32-ieee": (torch.float32, False, 1e-4), "tf32": (torch.float32, True, 5e-3),
              "bf16": (torch.bfloat16, False, 2e-2)}


@pytest.fixture
def precision(request, monkeypatch, matmul_tf32):
    """(dtype, error bound) of the test's precision, with TF32 allowed or not as it says, and the
    Triton kernels forced (past the per-shape dispatch)."""
    dtype, tf32, bound = PRECISIONS[request.param]
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    matmul_tf32(tf32)
    return dtype, bound


def _check(got, want, bound, what):
    error = rel_error(got, want)
    assert error <= bound, f"{what}: relative error {error:.3g} > {bound:g}"


@pytest.mark.parametrize("precision", list(PRECISIONS), indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_resnet18_conv_at_batch_256(precision, channels_last):
    """ResNet-18's 64 -> 64 conv (3 x 3, padding 1) on 256 images of 32 x 32: output and both
    gradients, each in the layout of its tensor."""
    dtype, bound = precision
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(256, 64, 32, 32, device="cuda").to(dtype, memory_format=layout).requires_grad_()
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(dtype, memory_format=layout).requires_grad_()
    m = torch.rand(64, 64, 3, 3, device="cuda") < 0.2
    y = ops.masked_conv2d(x, w, m, None, 1, 1)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = F.conv2d(x64, w64 * m, None, 1, 1)
    _check(y, ref, bound, "output")
    upstream = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, [x, w], upstream.to(dtype))
    rx, rw = torch.autograd.grad(ref, [x64, w64], upstream)
    _check(gx, rx, bound, "grad input")
    _check(gw, rw, bound, "grad weight")
    assert (gw[~m] == 0).all()
    assert y.is_contiguous(memory_format=layout) and gx.is_contiguous(memory_format=layout)
    assert gw.stride() == w.stride()


@pytest.mark.parametrize("precision", list(PRECISIONS), indirect=True)
def test_stacked_conv_of_four_models_on_a_shared_input(precision):
    """K = 4 models reading one batch (ConvNet-3's 128 -> 128 conv with bias, 16 x 16, batch 128):
    the input's gradient is the sum of the four models'."""
    dtype, bound = precision
    x = torch.randn(128, 128, 16, 16, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(4, 128, 128, 3, 3, device="cuda") / 34).to(dtype).requires_grad_()
    b = torch.randn(4, 128, device="cuda", dtype=dtype, requires_grad=True)
    m = torch.rand(4, 128, 128, 3, 3, device="cuda") < 0.2
    y = ops.stacked_masked_conv2d(x, w, m, b, padding=1)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.stack([F.conv2d(x64, w64[k] * m[k], b64[k], padding=1) for k in range(4)])
    _check(y, ref, bound, "output")
    upstream = torch.randn_like(ref)
    for got, want, what in zip(torch.autograd.grad(y, [x, w, b], upstream.to(dtype)),
                               torch.autograd.grad(ref, [x64, w64, b64], upstream), ("gx", "gw", "gb")):
        _check(got, want, bound, what)


@pytest.mark.parametrize("precision", list(PRECISIONS), indirect=True)
def test_interpolated_kernels_at_30_alphas(precision):
    """LMC's 30 networks between two weight sets, formed in the tile loads: a conv (ConvNet-3's
    128 -> 128 at 16 x 16, batch 64) and a linear layer (784 -> 300, batch 256)."""
    dtype, bound = precision
    alphas = torch.linspace(0, 1, 30, device="cuda")
    a64 = alphas.double()[:, None]
    x = torch.randn(64, 128, 16, 16, device="cuda", dtype=dtype)
    wa, wb = ((torch.randn(128, 128, 3, 3, device="cuda") / 34).to(dtype) for _ in range(2))
    ba, bb = (torch.randn(128, device="cuda", dtype=dtype) for _ in range(2))
    m = torch.rand(128, 128, 3, 3, device="cuda") < 0.2
    y = ops.interpolated_masked_conv2d(x, wa, wb, m, alphas, ba, bb, padding=1)
    weights = (1 - a64[..., None, None, None]) * wa.double() + a64[..., None, None, None] * wb.double()
    biases = (1 - a64) * ba.double() + a64 * bb.double()
    for k in (0, 7, 29):  # three alphas, to bound the float64 work
        _check(y[k], F.conv2d(x.double(), weights[k] * m, biases[k], padding=1), bound, f"conv alpha {k}")
    xl = torch.randn(256, 784, device="cuda", dtype=dtype)
    la, lb = ((torch.randn(300, 784, device="cuda") / 28).to(dtype) for _ in range(2))
    ml = torch.rand(300, 784, device="cuda") < 0.2
    yl = ops.interpolated_masked_linear(xl, la, lb, ml, alphas)
    linear = (1 - a64[..., None]) * la.double() + a64[..., None] * lb.double()
    _check(yl, torch.stack([F.linear(xl.double(), w * ml) for w in linear]), bound, "linear")


@pytest.mark.parametrize("precision", list(PRECISIONS), indirect=True)
@pytest.mark.parametrize("fan_in, fan_out", [(2048, 10), (784, 300)])
def test_masked_linear_at_batch_256(precision, fan_in, fan_out):
    """The ConvNet-3 head and LeNet-300-100's first layer: output and both gradients."""
    dtype, bound = precision
    x = torch.randn(256, fan_in, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(fan_out, fan_in, device="cuda") * fan_in**-0.5).to(dtype).requires_grad_()
    b = torch.randn(fan_out, device="cuda", dtype=dtype, requires_grad=True)
    m = torch.rand(fan_out, fan_in, device="cuda") < 0.2
    y = ops.masked_linear(x, w, m, b)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.linear(x64, w64 * m, b64)
    _check(y, ref, bound, "output")
    upstream = torch.randn_like(ref)
    for got, want, what in zip(torch.autograd.grad(y, [x, w, b], upstream.to(dtype)),
                               torch.autograd.grad(ref, [x64, w64, b64], upstream), ("gx", "gw", "gb")):
        _check(got, want, bound, what)


def _resnet18_problem(generator):
    """ResNet-18's 62 CIFAR parameter tensors at width 64 (values on the CPU), with 90% masks on the
    conv and linear weights."""
    from bench.bench_optim import resnet18_cifar_shapes

    shapes = resnet18_cifar_shapes(64)
    values = [torch.randn(shape, generator=generator) * 0.05 for _, shape in shapes]
    masks = [(torch.rand(shape, generator=generator) >= 0.9).cuda() if kind in ("conv", "linear") else None
             for kind, shape in shapes]
    return values, masks


def _unaligned_parameters(values):
    """The values as CUDA parameters, every other one a view one float past an aligned address."""
    params = []
    for i, value in enumerate(values):
        holder = torch.empty(value.numel() + i % 2, device="cuda")[i % 2:].view(value.shape)
        params.append(nn.Parameter(holder.copy_(value)))
    return params


OPTIMIZERS = {
    "sgd": (lambda ps, ms: MaskedSGD(ps, lr=0.1, weight_decay=5e-4, masks=ms),
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=5e-4)),
    "sgd-momentum": (lambda ps, ms: MaskedSGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, masks=ms),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (lambda ps, ms: MaskedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, masks=ms),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adamw": (lambda ps, ms: MaskedAdamW(ps, lr=1e-3, weight_decay=1e-2, masks=ms),
              lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2)),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_fused_optimizer_over_resnet18(monkeypatch, kind):
    """Three fused steps over ResNet-18's tensors equal torch.optim's steps followed by re-masking
    (the optimizer's contract), and the torch reference path of the same optimizer."""
    make_masked, make_torch = OPTIMIZERS[kind]
    generator = torch.Generator().manual_seed(0)
    values, masks = _resnet18_problem(generator)
    grads = [[torch.randn(v.shape, generator=generator).cuda() * 0.01 for v in values] for _ in range(3)]
    results = {}
    for path in ("triton", "torch", "torch.optim"):
        monkeypatch.setenv("FASTMASK_BACKEND", "torch" if path == "torch" else "triton")
        params = _unaligned_parameters(values)
        keep = {p: m for p, m in zip(params, masks) if m is not None}
        if path == "torch.optim":
            with torch.no_grad():
                for p, k in keep.items():
                    p.mul_(k)  # as the masked optimizers do when they get their masks
        opt = make_torch(params) if path == "torch.optim" else make_masked(params, keep)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
            if path == "torch.optim":
                with torch.no_grad():
                    for p, k in keep.items():
                        p.mul_(k)
        results[path] = [p.detach() for p in params]
        if path == "triton":
            assert all((p[~k] == 0).all() for p, k in keep.items())
    for a, b, c in zip(results["triton"], results["torch"], results["torch.optim"]):
        assert rel_error(a, b) < 1e-6
        assert rel_error(a, c) < 1e-5


N_ENTRIES = 11_689_512  # a ResNet-18's parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rademacher_probes_are_bit_exact_at_11_7m_entries(dtype):
    mask = torch.rand(N_ENTRIES, device="cuda") < 0.3
    for seed, first in ((0, 0), (2**40 + 5, 17), (123, 1)):
        got = ops.hutchinson.rademacher_probes(seed, first, 3, N_ENTRIES, mask, dtype, "cuda")
        want = ops.hutchinson.rademacher_probes_reference(seed, first, 3, N_ENTRIES, mask, dtype, "cuda")
        assert torch.equal(got, want), (seed, first)


def test_welford_accumulation_at_11_7m_entries():
    generator = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randint(0, 2, (4, N_ENTRIES), device="cuda", generator=generator) * 2 - 1).float()
    hz = torch.randn(4, N_ENTRIES, device="cuda", generator=generator)
    mean = torch.randn(N_ENTRIES, device="cuda", generator=generator)
    m2 = torch.rand(N_ENTRIES, device="cuda", generator=generator) * 5
    got = ops.hutchinson.accumulate_probes(z, hz, 5, mean, m2)
    want = ops.hutchinson.accumulate_probes_reference(z.double(), hz.double(), 5, mean.double(), m2.double())
    for a, b, what in zip(got, want, ("mean", "m2", "probe sums")):
        assert rel_error(a, b) < 1e-5, what
