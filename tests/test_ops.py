"""Masked conv2d / linear: the Triton kernels (interpreter on CPU) and the reference against float64;
the CPU memory setting every op runs under (``fastmask.backend.keep_freed_cpu_memory``)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastmask import backend, ops
from helpers import assert_close

# (N, C, H, W, O, kernel, stride, padding, dilation): 1x1/3x3/5x5, stride 2, padding 0/1/same/valid,
# dilation 2, batch 1, an even kernel with 'same' (asymmetric padding), non-square images.
CONV_CASES = [
    (2, 3, 7, 7, 5, 3, 1, 1, 1),
    (1, 3, 7, 7, 4, 1, 1, 0, 1),
    (2, 3, 7, 7, 5, 5, 1, "same", 1),
    (2, 3, 7, 7, 5, 3, 2, 1, 1),
    (1, 3, 7, 6, 3, 3, 1, "same", 2),
    (2, 2, 6, 5, 3, 2, 1, "same", 1),
    (1, 3, 7, 7, 2, 3, 2, "valid", 1),
]
SPARSITIES = [0.0, 0.5, 0.99, 1.0]


def random_mask(shape, sparsity, generator=None):
    return torch.rand(shape, generator=generator) >= sparsity


def conv_reference64(x, w, m, b, stride, padding, dilation):
    """F.conv2d in float64 on the pre-masked weight: the function masked_conv2d must compute."""
    return F.conv2d(x.double(), w.double() * m, None if b is None else b.double(), stride, padding, dilation)


def grads(y, inputs, upstream):
    return torch.autograd.grad(y, inputs, upstream)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_masked_conv2d_kernel_matches_float64(triton_backend, case, sparsity):
    N, C, H, W, O, R, stride, padding, dilation = case
    x = torch.randn(N, C, H, W, requires_grad=True)
    w = torch.randn(O, C, R, R, requires_grad=True)
    b = torch.randn(O, requires_grad=True)
    m = random_mask(w.shape, sparsity)
    y = ops.masked_conv2d(x, w, m, b, stride, padding, dilation)
    ref = conv_reference64(x, w, m, b, stride, padding, dilation)
    assert_close(y, ref, what="output")
    upstream = torch.randn_like(ref)
    gx, gw, gb = grads(y, [x, w, b], upstream.float())
    rx, rw, rb = grads(ref, [x, w, b], upstream)
    (dense_gw,) = grads(conv_reference64(x, w, torch.ones_like(m), b, stride, padding, dilation), [w], upstream)
    assert_close(gx, rx, what="grad input")
    assert_close(gw, rw, what="grad weight", scale=dense_gw)
    assert_close(gb, rb, what="grad bias")
    assert (gw[~m] == 0).all(), "grad weight must be exactly zero where the mask is 0"


def test_masked_conv2d_channels_last_and_no_bias(triton_backend):
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    m = random_mask(w.shape, 0.5)
    y = ops.masked_conv2d(x, w, m, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = conv_reference64(x, w, m, None, 1, 1, 1)
    assert_close(y, ref)
    upstream = torch.randn_like(ref)
    for got, want, what in zip(grads(y, [x, w], upstream.float()), grads(ref, [x, w], upstream), ("gx", "gw")):
        assert_close(got, want, what=what)


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("models, shared_mask", [(1, False), (3, False), (3, True)])
def test_stacked_masked_conv2d_matches_per_model_float64(triton_backend, models, shared_input, shared_mask):
    N, C, H, W, O = 2, 3, 7, 7, 4
    x = torch.randn(*(() if shared_input else (models,)), N, C, H, W, requires_grad=True)
    w = torch.randn(models, O, C, 3, 3, requires_grad=True)
    b = torch.randn(models, O, requires_grad=True)
    m = random_mask((1 if shared_mask else models, O, C, 3, 3), 0.5)
    y = ops.stacked_masked_conv2d(x, w, m, b, stride=2, padding=1)
    refs = torch.stack([conv_reference64(x if shared_input else x[k], w[k], m[0 if shared_mask else k], b[k], 2, 1, 1)
                        for k in range(models)])
    assert_close(y, refs)
    upstream = torch.randn_like(refs)
    for got, want, what in zip(grads(y, [x, w, b], upstream.float()), grads(refs, [x, w, b], upstream),
                               ("gx", "gw", "gb")):
        assert_close(got, want, what=what)


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[4], CONV_CASES[5]], ids=lambda c: "x".join(map(str, c)))
def test_cudnn_candidates_in_the_conv_ops_match_float64(cudnn_candidates, case, shared_input):
    """The torch candidates the per-shape dispatch may pick on CUDA: values, all three gradients, and
    the Triton kernel's output layout (the fake kernel promises it to torch.compile)."""
    N, C, H, W, O, k, stride, padding, dilation = case
    models = 3
    x = torch.randn(*(() if shared_input else (models,)), N, C, H, W, requires_grad=True)
    w = torch.randn(models, O, C, k, k, requires_grad=True)
    b = torch.randn(models, O, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    y = ops.stacked_masked_conv2d(x, w, m, b, stride, padding, dilation)
    assert y.is_contiguous()
    refs = torch.stack([conv_reference64(x if shared_input else x[i], w[i], m[i], b[i], stride, padding, dilation)
                        for i in range(models)])
    assert_close(y, refs)
    upstream = torch.randn_like(refs)
    for got, want, what in zip(grads(y, [x, w, b], upstream.float()), grads(refs, [x, w, b], upstream),
                               ("gx", "gw", "gb")):
        assert_close(got, want, what=what)
        assert got.stride() == want.stride(), what


def test_cudnn_candidate_keeps_channels_last(cudnn_candidates):
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    m = random_mask(w.shape, 0.5)
    y = ops.masked_conv2d(x, w, m, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, conv_reference64(x, w, m, None, 1, 1, 1))


def test_input_expanded_over_the_models_is_read_as_one_batch(triton_backend, monkeypatch):
    """Stack(x, shared=True) expands the batch over K (stride 0): the op gets the one batch, and the
    values and the gradient of the batch are those of K models on the same input."""
    seen = []
    conv_op, linear_op = ops.conv._conv_op, ops.linear._linear_op
    monkeypatch.setattr(ops.conv, "_conv_op", lambda x, *args: seen.append(x.shape[0]) or conv_op(x, *args))
    monkeypatch.setattr(ops.linear, "_linear_op", lambda x, *args: seen.append(x.shape[0]) or linear_op(x, *args))
    models = 3
    base = torch.randn(2, 3, 6, 5, requires_grad=True)
    w = torch.randn(models, 4, 3, 3, 3, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    y = ops.stacked_masked_conv2d(base.expand(models, *base.shape), w, m, padding=1)
    refs = torch.stack([conv_reference64(base, w[k], m[k], None, 1, 1, 1) for k in range(models)])
    assert_close(y, refs)
    upstream = torch.randn_like(refs)
    for got, want, what in zip(grads(y, [base, w], upstream.float()), grads(refs, [base, w], upstream), ("gx", "gw")):
        assert_close(got, want, what=what)
    features = torch.randn(5, 7, requires_grad=True)
    lw = torch.randn(models, 4, 7)
    out = ops.stacked_masked_linear(features.expand(models, 5, 7), lw, torch.ones(models, 4, 7, dtype=torch.bool))
    assert_close(out, torch.stack([features.double() @ lw[k].double().T for k in range(models)]))
    assert seen == [1, 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_conv2d_half_precision_kernel(triton_backend, dtype):
    x = torch.randn(2, 3, 7, 7, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=dtype, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    y = ops.masked_conv2d(x, w, m, padding=1)
    assert y.dtype == dtype
    ref = conv_reference64(x, w, m, None, 1, 1, 1)
    assert_close(y, ref, dtype)
    upstream = torch.randn_like(ref)
    for got, want, what in zip(grads(y, [x, w], upstream.to(dtype)), grads(ref, [x, w], upstream), ("gx", "gw")):
        assert_close(got, want, dtype, what=what)


LINEAR_CASES = [(1, 7, 5), (4, 10, 3), (17, 33, 19)]


@pytest.mark.parametrize("batch, in_features, out_features", LINEAR_CASES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_masked_linear_kernel_matches_float64(triton_backend, batch, in_features, out_features, sparsity):
    x = torch.randn(batch, in_features, requires_grad=True)
    w = torch.randn(out_features, in_features, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True)
    m = random_mask(w.shape, sparsity)
    y = ops.masked_linear(x, w, m, b)
    ref = F.linear(x.double(), w.double() * m, b.double())
    assert_close(y, ref)
    upstream = torch.randn_like(ref)
    gx, gw, gb = grads(y, [x, w, b], upstream.float())
    (dense_gw,) = grads(F.linear(x.double(), w.double(), b.double()), [w], upstream)
    for got, want, what, scale in zip((gx, gw, gb), grads(ref, [x, w, b], upstream), ("gx", "gw", "gb"),
                                      (None, dense_gw, None)):
        assert_close(got, want, what=what, scale=scale)
    assert (gw[~m] == 0).all()


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("models, shared_mask", [(1, False), (3, False), (3, True)])
def test_stacked_masked_linear_matches_per_model_float64(triton_backend, models, shared_input, shared_mask):
    x = torch.randn(*(() if shared_input else (models,)), 5, 9, requires_grad=True)
    w = torch.randn(models, 6, 9, requires_grad=True)
    b = torch.randn(models, 6, requires_grad=True)
    m = random_mask((1 if shared_mask else models, 6, 9), 0.5)
    y = ops.stacked_masked_linear(x, w, m, b)
    refs = torch.stack([F.linear((x if shared_input else x[k]).double(), w[k].double() * m[0 if shared_mask else k],
                                 b[k].double()) for k in range(models)])
    assert_close(y, refs)
    upstream = torch.randn_like(refs)
    for got, want, what in zip(grads(y, [x, w, b], upstream.float()), grads(refs, [x, w, b], upstream),
                               ("gx", "gw", "gb")):
        assert_close(got, want, what=what)


def test_masked_linear_keeps_leading_dimensions(triton_backend):
    x = torch.randn(2, 3, 8)
    w, m = torch.randn(4, 8), random_mask((4, 8), 0.3)
    assert_close(ops.masked_linear(x, w, m), F.linear(x.double(), w.double() * m))


@pytest.mark.parametrize("backend_name", ["torch", "auto"])
def test_reference_path_matches_float64(monkeypatch, backend_name):
    """On the CPU the reference runs: same function, float64 supported exactly, double backward works."""
    monkeypatch.setenv("FASTMASK_BACKEND", backend_name)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    y = ops.masked_conv2d(x, w, m, stride=2, padding=1)
    assert_close(y, conv_reference64(x, w, m, None, 2, 1, 1), torch.float64)
    (gw,) = torch.autograd.grad(y.square().sum(), [w], create_graph=True)
    assert (gw[~m] == 0).all()
    (hvp,) = torch.autograd.grad(gw.sum(), [w])
    assert torch.isfinite(hvp).all()


def test_grouped_conv_uses_reference(triton_backend):
    x = torch.randn(2, 4, 6, 6)
    w, m = torch.randn(6, 2, 3, 3), random_mask((6, 2, 3, 3), 0.5)
    assert_close(ops.masked_conv2d(x, w, m, groups=2), F.conv2d(x.double(), w.double() * m, groups=2))


def test_double_backward_through_kernel_path(triton_backend):
    """create_graph=True through the kernel op falls back to the differentiable reference."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float32)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    (gw,) = torch.autograd.grad(ops.masked_conv2d(x, w, m).square().sum(), [w], create_graph=True)
    (hvp,) = torch.autograd.grad(gw.sum(), [w])
    w64 = w.detach().double().requires_grad_()
    (gw64,) = torch.autograd.grad(F.conv2d(x.double(), w64 * m).square().sum(), [w64], create_graph=True)
    (hvp64,) = torch.autograd.grad(gw64.sum(), [w64])
    assert_close(hvp, hvp64, what="Hessian-vector product")


@pytest.mark.parametrize("bad, error, match", [
    (dict(mask=torch.ones(5, 3, 3, 2, dtype=torch.bool)), ValueError, "mask has shape"),
    (dict(mask=torch.full((5, 3, 3, 3), 0.5)), ValueError, "mask must be boolean"),
    (dict(input=torch.ones(2, 3, 7, 7, dtype=torch.int64)), TypeError, "input must be a floating"),
    (dict(input=torch.randn(7, 7)), ValueError, "input must be"),
    (dict(weight=torch.randn(5, 3, 3)), ValueError, "weight must be"),
    (dict(input=torch.randn(2, 4, 7, 7)), ValueError, "channels"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(input=torch.randn(2, 3, 7, 7, device="meta")), ValueError, "one device"),
    (dict(input=torch.randn(2, 3, 7, 7, dtype=torch.float64)), TypeError, "input .* and weight"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, "bias .* and weight"),
    (dict(stride=[2]), ValueError, "stride must be"),  # torch alone would take it on the CPU
    (dict(dilation=torch.tensor(1)), ValueError, "dilation must be"),
])
def test_masked_conv2d_bad_input_names_the_argument(bad, error, match):
    args = dict(input=torch.randn(2, 3, 7, 7), weight=torch.randn(5, 3, 3, 3),
                mask=torch.ones(5, 3, 3, 3, dtype=torch.bool), padding=0)
    args.update(bad)
    with pytest.raises(error, match=match):
        ops.masked_conv2d(**args)


def test_masked_linear_bad_input_names_the_argument():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask has shape"):
        ops.masked_linear(torch.randn(2, 4), w, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        ops.masked_linear(torch.randn(2, 5), w, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="models"):
        ops.stacked_masked_linear(torch.randn(2, 5, 4), w.expand(3, 3, 4), torch.ones(3, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bias .* and weight"):
        ops.masked_linear(torch.randn(2, 4), w, torch.ones(3, 4, dtype=torch.bool), torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must have shape"):  # F.linear alone would broadcast it
        ops.masked_linear(torch.randn(2, 4), w, torch.ones(3, 4, dtype=torch.bool), torch.randn(1))


def test_float_zero_one_mask_is_accepted():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    m = (torch.rand(3, 4) > 0.5).float()
    assert_close(ops.masked_linear(x, w, m), F.linear(x.double(), w.double() * m.double()))


def test_stacked_conv_on_the_cpu_returns_the_models_in_order():
    # the layers after it run faster on [K, N, O, H, W] in memory order than on a transposed view
    for x in (torch.randn(3, 2, 4, 6, 6), torch.randn(2, 4, 6, 6)):  # per-model and shared input
        w, m = torch.randn(3, 5, 4, 3, 3), torch.rand(3, 5, 4, 3, 3) > 0.5
        y = ops.stacked_masked_conv2d(x, w, m, padding=1)
        assert y.is_contiguous()
        for k in range(3):
            assert_close(y[k], F.conv2d((x[k] if x.dim() == 5 else x).double(), w[k].double() * m[k], padding=1))


# ------------------------------------------------------------------------- 2 x 2 average pooling


@pytest.mark.parametrize("shape", [(3, 5, 6, 8), (1, 1, 2, 2), (2, 7, 10, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_avg_pool2x2_matches_torch_with_its_gradients(monkeypatch, shape, channels_last):
    fast_calls = []
    monkeypatch.setattr(ops.pool._AvgPool2x2, "apply", lambda x: fast_calls.append(1) or
                        torch.autograd.Function.apply.__func__(ops.pool._AvgPool2x2, x))
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, reference = ops.avg_pool2x2(x), F.avg_pool2d(x, 2)
    assert fast_calls, "the CPU form was not taken"
    torch.testing.assert_close(y, reference, atol=1e-15, rtol=1e-15)
    upstream = torch.randn_like(y, requires_grad=True)
    (gx,), (gr,) = (torch.autograd.grad(out, x, upstream, create_graph=True) for out in (y, reference))
    assert torch.equal(gx, gr)
    # double backward (a Hessian-vector product goes through the pooling's backward)
    v = torch.randn_like(x)
    (ggx,), (ggr,) = (torch.autograd.grad(g, upstream, v) for g in (gx, gr))
    torch.testing.assert_close(ggx, ggr, atol=1e-15, rtol=1e-15)
    assert torch.autograd.gradcheck(ops.avg_pool2x2, (x.detach().requires_grad_(True),))


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (3, 4, 4), (2, 3, 6, 7)])
def test_avg_pool2x2_falls_back_to_torch_where_the_cpu_form_does_not_apply(shape):
    x = torch.randn(shape)
    assert torch.equal(ops.avg_pool2x2(x), F.avg_pool2d(x, 2))
    half = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    assert torch.equal(ops.avg_pool2x2(half), F.avg_pool2d(half, 2))


def test_avg_pool_module_takes_the_fast_form_only_for_2x2_stride_2(monkeypatch):
    from fastmask.nn import AvgPool2d

    fast_calls = []
    monkeypatch.setattr(ops, "avg_pool2x2", lambda x: fast_calls.append(1) or F.avg_pool2d(x, 2))
    x = torch.randn(2, 3, 8, 6)
    for args, kwargs, fast in [((2, 2), {}, True), ((2,), {}, True), ((3, 2), {}, False), ((2, 1), {}, False),
                               ((2, 2), {"padding": 1}, False), ((2, 2), {"ceil_mode": True}, False),
                               ((2, 2), {"divisor_override": 3}, False)]:
        fast_calls.clear()
        assert_close(AvgPool2d(*args, **kwargs)(x), torch.nn.AvgPool2d(*args, **kwargs)(x.double()))
        assert bool(fast_calls) == fast, (args, kwargs)


def test_avg_pool2x2_forward_mode_and_the_reference_backend(monkeypatch):
    x, tangent = torch.randn(2, 3, 6, 4, dtype=torch.float64), torch.randn(2, 3, 6, 4, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        pooled = torch.autograd.forward_ad.unpack_dual(ops.avg_pool2x2(torch.autograd.forward_ad.make_dual(x, tangent)))
    torch.testing.assert_close(pooled.tangent, F.avg_pool2d(tangent, 2), atol=1e-15, rtol=1e-15)
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    monkeypatch.setattr(ops.pool._AvgPool2x2, "apply", lambda x: pytest.fail("the CPU form ran under the torch backend"))
    assert torch.equal(ops.avg_pool2x2(x), F.avg_pool2d(x, 2))


# ------------------------------------------------------------------------- CPU memory (glibc)

# Frees a 64 MiB tensor, then prints whether fastmask.backend made its setting and how many MiB of
# free memory glibc's heap holds (mallinfo2, glibc >= 2.33; -1 without it).
FREED_MEMORY_PROBE = """
import ctypes, torch, fastmask.backend
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print(fastmask.backend.CPU_MEMORY_KEPT, -1)
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
tensor = torch.ones(16 << 20)
del tensor
print(fastmask.backend.CPU_MEMORY_KEPT, libc.mallinfo2().fordblks >> 20)
"""


def freed_memory_probe(**env):
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "FASTMASK_KEEP_CPU_MEMORY", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True, timeout=120,
                         env={**environment, **env}, check=True).stdout.split()
    if out[1] == "-1":
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(backend._glibc_version() is None, reason="the setting is glibc's")
def test_freed_cpu_memory_stays_in_the_heap_unless_switched_off():
    # glibc's default would hand the 64 MiB block back to the OS (mmap, then munmap; any mmap
    # threshold would: its largest is 32 MiB): the next tensor of that size would fault its pages in again.
    kept, free_mib = freed_memory_probe()
    assert kept and free_mib >= 64
    for switched_off in ({"FASTMASK_KEEP_CPU_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}):
        kept, free_mib = freed_memory_probe(**switched_off)
        assert not kept and free_mib < 64, switched_off
    assert not freed_memory_probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("case", CONV_CASES[:4], ids=lambda c: "x".join(map(str, c)))
def test_masked_conv2d_cuda(monkeypatch, precision, case):
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    N, C, H, W, O, R, stride, padding, dilation = case
    N, C, O = N * 8, C * 11, O * 13  # sizes that cross tile boundaries on the GPU
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tol = {"fp32": torch.float32, "tf32": "tf32", "bf16": torch.bfloat16}[precision]
    x = torch.randn(N, C, H + 9, W + 9, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(O, C, R, R, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(O, device="cuda", dtype=dtype, requires_grad=True)
    m = random_mask(w.shape, 0.5).cuda()
    y = ops.masked_conv2d(x, w, m, b, stride, padding, dilation)
    ref = conv_reference64(x, w, m, b, stride, padding, dilation)
    assert_close(y, ref, tol)
    upstream = torch.randn_like(ref)
    for got, want, what in zip(grads(y, [x, w, b], upstream.to(dtype)), grads(ref, [x, w, b], upstream),
                               ("gx", "gw", "gb")):
        assert_close(got, want, tol, what=what)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_stacked_masked_linear_cuda(monkeypatch, matmul_tf32, precision):
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    matmul_tf32(precision == "tf32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tol = {"fp32": torch.float32, "tf32": "tf32", "bf16": torch.bfloat16}[precision]
    x = torch.randn(3, 257, 300, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(3, 129, 300, device="cuda", dtype=dtype, requires_grad=True)
    m = random_mask(w.shape, 0.9).cuda()
    y = ops.stacked_masked_linear(x, w, m)
    ref = torch.matmul(x.double(), (w.double() * m).transpose(1, 2))
    assert_close(y, ref, tol)
    upstream = torch.randn_like(ref)
    for got, want, what in zip(grads(y, [x, w], upstream.to(dtype)), grads(ref, [x, w], upstream), ("gx", "gw")):
        assert_close(got, want, tol, what=what)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shared_input", [False, True])
def test_cpu_stacked_conv_as_k_convolutions_or_one_grouped_float64(monkeypatch, groups, shared_input):
    """The CPU's two ways to run a stack's conv (K convolutions above ``CPU_PER_MODEL_MACS``, one
    grouped convolution below) give each model's own conv: values and gradients, odd sizes and
    uneven padding."""
    from fastmask.ops import conv as conv_op

    K, N, C, H, W, O = 3, 2, 4, 7, 5, 6
    x = torch.randn(*((1,) if shared_input else (K,)), N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, O, C // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(K, O, dtype=torch.float64, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    padded = F.pad(x, (1, 0, 2, 1))
    want = torch.stack([F.conv2d(padded[0 if shared_input else k], w[k] * m[k], b[k], (2, 1), 0, 1, groups)
                        for k in range(K)])
    upstream = torch.randn_like(want)
    want_grads = grads(want, [x, w, b], upstream)
    for cut in (0, float("inf")):
        monkeypatch.setattr(conv_op, "CPU_PER_MODEL_MACS", cut)
        got = ops.conv2d_reference(x, w, m, b, (2, 1), (2, 1, 1, 0), (1, 1), groups)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, g_want, what in zip(grads(got, [x, w, b], upstream), want_grads, ("gx", "gw", "gb")):
            torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-12, msg=what)


class _Chose(dict):
    """A dispatch cache that has chosen ``choice`` for every shape."""

    def __init__(self, choice):
        super().__init__()
        self.choice = choice

    def get(self, key, default=None):
        return self.choice


@pytest.mark.parametrize("choice", ["torch", "torch_per_model"])
def test_a_shape_decided_for_torch_runs_plain_ops_without_the_custom_op(monkeypatch, choice):
    """Once the dispatch chose a torch candidate for a shape, the eager wrappers run its ops
    directly (the custom ops' host cost is ~1 ms per conv): each model's own masked conv / linear,
    values and gradients in float64; forcing a backend turns this off."""
    from fastmask import backend
    from fastmask.ops import _common, conv as conv_op, linear as linear_op

    monkeypatch.setattr(backend, "use_triton", lambda *tensors, **options: True)
    monkeypatch.setattr(_common, "_fastest", _Chose(choice))

    def refuse(*args):
        raise AssertionError("the custom op ran")

    for module, name in ((conv_op, "_conv_op"), (conv_op, "_interpolated_conv_op"), (linear_op, "_linear_op"),
                         (linear_op, "_interpolated_linear_op")):
        monkeypatch.setattr(module, name, refuse)
    K, N, C, H, W, O = 3, 2, 4, 7, 5, 6
    x = torch.randn(K, N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, O, C, 3, 3, dtype=torch.float64, requires_grad=True)
    m = random_mask(w.shape, 0.5)
    got = ops.stacked_masked_conv2d(x, w, m, stride=(2, 1), padding=1)
    want = torch.stack([F.conv2d(x[k], w[k] * m[k], None, (2, 1), 1) for k in range(K)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(want)
    for g, g_want, what in zip(grads(got, [x, w], upstream), grads(want, [x, w], upstream), ("gx", "gw")):
        torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-12, msg=what)
    xl, wl = torch.randn(K, 5, 7, dtype=torch.float64), torch.randn(K, 4, 7, dtype=torch.float64)
    ml = random_mask(wl.shape, 0.5)
    torch.testing.assert_close(ops.stacked_masked_linear(xl, wl, ml), torch.matmul(xl, (wl * ml).transpose(1, 2)))
    alphas = torch.tensor([0.0, 0.25, 1.0])
    wa, wb = w[0].detach(), w[1].detach()
    torch.testing.assert_close(ops.interpolated_masked_conv2d(x[0].detach(), wa, wb, m[0], alphas, padding=1),
                               torch.stack([F.conv2d(x[0].detach(), ((1 - a) * wa + a * wb) * m[0], None, 1, 1)
                                            for a in alphas.tolist()]))
    torch.testing.assert_close(ops.interpolated_masked_linear(xl[0], wl[0], wl[1], ml[0], alphas),
                               torch.stack([xl[0] @ (((1 - a) * wl[0] + a * wl[1]) * ml[0]).T
                                            for a in alphas.tolist()]))
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")
    assert _common._chosen_torch(("any shape",), refuse) is None


def test_an_undecided_shape_is_decided_before_its_first_call_runs(monkeypatch):
    """On CUDA the first call of a shape first runs its custom op once, without autograd, so that
    the dispatch decides; then that call takes the chosen path like every later one (CUDA faked)."""
    from fastmask.ops import _common

    monkeypatch.setattr(_common, "_fastest", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []

    def decide():
        calls.append(torch.is_grad_enabled())
        _common._fastest[("shape",)] = "torch"

    assert _common._chosen_torch(("shape",), decide) == "torch"
    assert _common._chosen_torch(("shape",), decide) == "torch"
    assert calls == [False]  # once, without autograd
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _common._chosen_torch(("another shape",), decide) is None  # never inside a capture
    assert calls == [False]


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True])
def test_dispatch_on_cuda_gives_the_masked_conv_before_and_after_it_chose(monkeypatch, shared_input):
    """Under ``auto`` the first call times the candidates (through the custom op) and later calls
    take the chosen one (the plain ops where torch won): both calls compute each model's masked conv."""
    monkeypatch.setenv("FASTMASK_BACKEND", "auto")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    K, N, C, H, O = 3, 37, 19, 13, 23
    x = torch.randn(1 if shared_input else K, N, C, H, H, device="cuda", requires_grad=True)
    w = torch.randn(K, O, C, 3, 3, device="cuda", requires_grad=True)
    m = random_mask(w.shape, 0.5).cuda()
    want = torch.stack([F.conv2d(x[0 if shared_input else k].double(), w[k].double() * m[k], None, 1, 1)
                        for k in range(K)])
    upstream = torch.randn_like(want)
    want_grads = grads(want, [x, w], upstream)
    for call in range(2):
        got = ops.stacked_masked_conv2d(x, w, m, padding=1)
        assert_close(got, want, torch.float32, what=f"call {call}")
        for g, g_want, what in zip(grads(got, [x, w], upstream.float()), want_grads, ("gx", "gw")):
            assert_close(g, g_want, torch.float32, what=f"{what}, call {call}")
