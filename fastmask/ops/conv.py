"""Masked conv2d, for one model, a stack of K models, or the K networks between two weight sets:
the wrapper of ``fastmask.kernels.masked_conv`` (implicit-GEMM forward, grad-input, grad-weight).

``masked_conv2d(x, w, m)`` is ``F.conv2d(x, w * m)`` with the same gradients (the weight's
gradient is zero where the mask is 0); ``stacked_masked_conv2d`` runs K models in one launch;
``interpolated_masked_conv2d`` (forward only) runs the K networks ``(1 - alpha_k) * a + alpha_k * b``,
forming each interpolated masked weight inside the kernel's tile loads. Where each call runs: see
``fastmask.ops``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmask.masks import check as check_mask
from fastmask.ops._common import (_allow_tf32_conv, _autocast, _check_devices, _check_float, _chosen_torch,
                                  _conv_geometry, _interpolation_args, _key, _laid_out_like, _off_kernel_ground,
                                  _one_batch_if_expanded, _pick, _plain_or_named_error, interpolate_weights)


# ----------------------------------------------------------------------------- torch reference


# On the CPU a grouped convolution over K models loses to K separate ones once each model's
# convolution is large (fwd+bwd, one thread, K 2-4, grouped/looped time: 0.9-0.97 at 4e7-6e8
# multiply-adds per model, 1.1 at 9.2e8 (make bench-headline's K=4 ConvNet-3 14x14 row), 1.05-1.3
# at 1.8e9-2.4e9; the cut between 6e8 and 9e8 is rough).
CPU_PER_MODEL_MACS = 8e8


def _conv_per_model(x: Tensor, w: Tensor, stride) -> bool:
    """Whether the CPU runs a stacked conv with per-model inputs as K convolutions (see above)."""
    if x.device.type != "cpu":
        return False
    N, (H, W), (sh, sw) = x.shape[1], x.shape[-2:], stride
    return N * w[0].numel() * (H // sh) * (W // sw) >= CPU_PER_MODEL_MACS


def conv2d_reference(x, w, m, bias, stride, padding, dilation, groups=1, per_model: Optional[bool] = None):
    """Stacked masked conv2d in plain torch: x [K or 1, N, C, H, W], w [K, O, C/g, R, S] -> [K, N, O, OH, OW].

    With per-model inputs the K models run as one grouped convolution, or as K convolutions when
    ``per_model`` (None: the CPU's rule above; on CUDA the dispatch times both)."""
    K, O = w.shape[:2]
    N = x.shape[1]
    wm = (w * m).reshape(K * O, *w.shape[2:])
    pt, pb, pl, pr = padding
    if (pt, pl) != (pb, pr):
        x = F.pad(x, (pl, pr, pt, pb))
        pt = pl = 0
    flat_bias = None if bias is None else bias.reshape(K * O)
    if x.shape[0] == 1 and groups == 1:  # shared input: the K models are K*O output channels
        y = F.conv2d(x.squeeze(0), wm, flat_bias, stride, (pt, pl), dilation)
    elif _conv_per_model(x, w, stride) if per_model is None else per_model:  # K convolutions, each the one a model alone would run
        x = x.expand(K, *x.shape[1:])
        return torch.stack([F.conv2d(x[k], wm.view(w.shape)[k], None if bias is None else bias[k], stride, (pt, pl),
                                     dilation, groups) for k in range(K)])
    else:  # per-model input: the K models are K groups of one grouped conv
        xs = x.expand(K, *x.shape[1:]).transpose(0, 1).reshape(N, K * x.shape[2], *x.shape[3:])
        y = F.conv2d(xs, wm, flat_bias, stride, (pt, pl), dilation, K * groups)
    return y.view(N, K, O, *y.shape[-2:]).transpose(0, 1)



# ----------------------------------------------------------------------------- conv op


def _conv_key(x, w, m, bias, stride, padding, dilation) -> tuple:
    return _key(x, w, m, extra=("conv_fwd", bias is None, *stride, *padding, *dilation, _allow_tf32_conv()))


@torch.library.custom_op("fastmask::stacked_masked_conv2d", mutates_args=())
def _conv_op(x: Tensor, w: Tensor, m: Tensor, bias: Optional[Tensor], stride: List[int],
             padding: List[int], dilation: List[int]) -> Tensor:
    from fastmask.kernels import masked_conv

    def reference(per_model: bool):
        return lambda: _in_kernel_layout(conv2d_reference(x, w, m, bias, stride, padding, dilation,
                                                          per_model=per_model), x)

    candidates = {"triton": lambda: masked_conv.conv_forward(x, w, m, bias, stride, padding, dilation,
                                                             _allow_tf32_conv()),
                  "torch": reference(False)}
    if x.shape[0] > 1:  # one batch per model: K convolutions may beat one grouped convolution
        candidates["torch_per_model"] = reference(True)
    return _pick(_conv_key(x, w, m, bias, stride, padding, dilation), candidates)()


@_conv_op.register_fake
def _(x, w, m, bias, stride, padding, dilation):
    from fastmask.kernels.masked_conv import output_size, stacked_empty

    K, O, _, R, S = w.shape
    OH = output_size(x.shape[3], R, stride[0], padding[0], padding[1], dilation[0])
    OW = output_size(x.shape[4], S, stride[1], padding[2], padding[3], dilation[1])
    return stacked_empty((K, x.shape[1], O, OH, OW), x)


def _restrided(t: Tensor, strides: Sequence[int], empty: Callable[[], Tensor]) -> Tensor:
    """``t`` with ``strides``: a view when ``t`` already has that memory order (the strides of
    size-1 dimensions aside), else a copy into ``empty()``. The op's output strides must not depend
    on which candidate ran, or code compiled against the fake kernels (torch.compile asserts the
    strides) fails; a cuDNN result already in that order (one model) is then not copied."""
    strides = tuple(strides)
    if t.stride() == strides:
        return t
    if all(size == 1 or have == want for size, have, want in zip(t.shape, t.stride(), strides)):
        return t.as_strided(t.shape, strides)
    return empty().copy_(t)


def _in_kernel_layout(y: Tensor, like: Tensor) -> Tensor:
    """A stacked conv result (or input gradient) in the layout the Triton kernels and the fake
    kernels give (``stacked_empty``), copied only where its memory order differs (see ``_restrided``)."""
    from fastmask.kernels.masked_conv import stacked_empty, stacked_strides

    return _restrided(y, stacked_strides(y.shape, like), lambda: stacked_empty(y.shape, like))


def _in_weight_layout(gw: Tensor, w: Tensor) -> Tensor:
    """A weight gradient in the layout of the fake kernel's ``torch.empty_like(w)``, copied only where it differs."""
    return _restrided(gw, torch.empty_like(w, device="meta").stride(), lambda: torch.empty_like(w))


def _conv_reference_backward(grad, x, w, m, stride, padding, dilation, need_x: bool, need_w: bool):
    """(grad_x, grad_w) of ``conv2d_reference`` (groups 1) through cuDNN's convolution backward,
    without autograd: a custom op's implementation runs below autograd, where autograd.grad cannot."""
    K, O = w.shape[:2]
    N, C, H, W = x.shape[1:]
    pt, pb, pl, pr = padding
    symmetric = (pt, pl) == (pb, pr)
    padded = x if symmetric else F.pad(x, (pl, pr, pt, pb))
    shared = x.shape[0] == 1  # as in conv2d_reference: the K models are K*O output channels
    flat_x = padded[0] if shared else padded.transpose(0, 1).reshape(N, K * C, *padded.shape[-2:])
    flat_grad = grad.transpose(0, 1).reshape(N, K * O, *grad.shape[-2:])
    wm = (w * m).reshape(K * O, *w.shape[2:])
    gx, gw, _ = torch.ops.aten.convolution_backward(
        flat_grad, flat_x, wm, None, list(stride), [pt, pl] if symmetric else [0, 0], list(dilation), False, [0, 0],
        1 if shared else K, [need_x, need_w, False])
    if need_x:
        gx = gx.unsqueeze(0) if shared else gx.reshape(N, K, C, *gx.shape[-2:]).transpose(0, 1)
        gx = gx if symmetric else gx[..., pt:pt + H, pl:pl + W]
    if need_w:
        gw = gw.reshape(w.shape).mul_(m)  # cuDNN's fresh result: masked in place
    return gx, gw


def _conv_reference_grads(grad, x, w, m, stride, padding, dilation, need_x: bool, need_w: bool):
    """(grad_x, grad_w) by autograd through the reference, keeping the graph (double backward)."""
    y = conv2d_reference(x, w, m, None, stride, padding, dilation)
    wanted = [t for t, need in ((x, need_x), (w, need_w)) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
    return (next(grads) if need_x else None), (next(grads) if need_w else None)


@torch.library.custom_op("fastmask::stacked_masked_conv2d_backward", mutates_args=())
def _conv_backward_op(grad: Tensor, x: Tensor, w: Tensor, m: Tensor, stride: List[int], padding: List[int],
                      dilation: List[int], need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    from fastmask.kernels import masked_conv

    tf32 = _allow_tf32_conv()

    def triton_grads():
        gx = gw = grad.new_empty(0)
        if need_x:
            gx = masked_conv.conv_grad_input(grad, w, m, x, stride, padding, dilation, tf32)
            if x.shape[0] == 1 and w.shape[0] > 1:  # a shared input: sum the K models' gradients
                gx = _in_kernel_layout(gx.sum(0, keepdim=True), x)
        if need_w:
            gw = masked_conv.conv_grad_weight(grad, x, w, m, stride, padding, dilation, tf32)
        return gx, gw

    def torch_grads():
        gx, gw = _conv_reference_backward(grad, x, w, m, stride, padding, dilation, need_x, need_w)
        gx = _in_kernel_layout(gx, x) if need_x else grad.new_empty(0)
        gw = _in_weight_layout(gw, w) if need_w else grad.new_empty(0)
        return gx, gw

    key = _key(grad, x, w, m, extra=("conv_bwd", need_x, need_w, *stride, *padding, *dilation, tf32))
    return _pick(key, {"triton": triton_grads, "torch": torch_grads})()


@_conv_backward_op.register_fake
def _(grad, x, w, m, stride, padding, dilation, need_x, need_w):
    from fastmask.kernels.masked_conv import stacked_empty

    return (stacked_empty(x.shape, x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _conv_setup(ctx, inputs, output):
    x, w, m, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, m)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad):
    x, w, m = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True (double backward): stay differentiable
        gx, gw = _conv_reference_grads(grad, x, w, m, *ctx.conv_args, need_x, need_w)
    else:
        gx, gw = _conv_backward_op(grad, x, w, m, *ctx.conv_args, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
    gb = grad.sum((1, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, gw, None, gb, None, None, None


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)



def _stacked_conv_input(input: Tensor, K: int, holder: str, channels: int, groups: int) -> Tensor:
    """``input`` as ``[K or 1, N, C, H, W]``, checked against K models (held by ``holder``) of ``channels`` inputs."""
    if input.dim() not in (4, 5):
        raise ValueError(f"input must be [K, N, C, H, W] or [N, C, H, W], got shape {tuple(input.shape)}")
    x = input if input.dim() == 5 else input.unsqueeze(0)
    if x.shape[0] not in (1, K):
        raise ValueError(f"input holds {x.shape[0]} models but {holder} holds {K}")
    if x.shape[2] != channels:
        raise ValueError(f"input has {x.shape[2]} channels but weight expects {channels} (groups={groups})")
    return _one_batch_if_expanded(x)


def _stacked_conv_args(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], stride, padding,
                       dilation, groups: int) -> tuple:
    """A stacked conv's arguments checked (errors name the argument) and brought to the op's form:
    (x [K or 1, N, C, H, W], weight, boolean mask, bias, stride pair, (top, bottom, left, right), dilation pair)."""
    _check_float("input", input)
    _check_float("weight", weight)
    if weight.dim() != 5:
        raise ValueError(f"weight must be [K, O, C/groups, R, S] (5-d), got shape {tuple(weight.shape)}")
    K = weight.shape[0]
    x = _stacked_conv_input(input, K, "weight", weight.shape[2] * groups, groups)
    if bias is not None and tuple(bias.shape) != (K, weight.shape[1]):
        raise ValueError(f"bias must have shape {(K, weight.shape[1])}, got {tuple(bias.shape)}")
    _check_devices(input=input, weight=weight, mask=mask, bias=bias)
    mask = check_mask(mask, weight.shape, stacked=True)
    stride, pads, dilation = _conv_geometry(tuple(weight.shape[-2:]), stride, padding, dilation)
    x, weight, bias = _autocast(x, weight, bias)
    for name, t in (("input", x), ("bias", bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name} ({t.dtype}) and weight ({weight.dtype}) must have one dtype")
    return x, weight, mask, bias, stride, pads, dilation


def _conv_route(x, weight, mask, bias, stride, pads, dilation, groups: int) -> Optional[str]:
    """Where a checked stacked conv runs: None for the custom op (the Triton kernels or, while
    undecided, the per-shape timing), else plain torch ops: "reference" off the kernels' ground
    (CPU, float64, groups, functorch), or the torch candidate the dispatch chose (see _chosen_torch)."""
    if groups != 1 or _off_kernel_ground(x, weight):
        return "reference"
    return _chosen_torch(_conv_key(x, weight, mask, bias, stride, pads, dilation),
                         lambda: _conv_op(x, weight, mask, bias, list(stride), pads, list(dilation)))


def stacked_masked_conv2d(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                          stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Masked conv2d of K models at once: ``y[k] = F.conv2d(x[k], weight[k] * mask[k], bias[k], ...)``.

    Args:
        input: ``[K, N, C, H, W]`` (one batch per model) or ``[N, C, H, W]`` (shared by all K).
        weight: ``[K, O, C // groups, R, S]``.
        mask: boolean (or 0/1) of the weight's shape, or ``[1, ...]`` shared by all K.
        bias: ``[K, O]`` or None.
        stride, padding, dilation, groups: as ``F.conv2d``; padding also ``'same'`` / ``'valid'``.

    Returns ``[K, N, O, OH, OW]``. One kernel launch covers all K models.

    Example::

        w = torch.randn(4, 16, 3, 3, 3)                  # 4 models' weights [K, O, C, R, S]
        keep = torch.rand_like(w) > 0.8                  # each model's own mask
        y = stacked_masked_conv2d(torch.randn(4, 32, 3, 8, 8), w, keep, padding=1)   # [4, 32, 16, 8, 8]
    """
    args = _stacked_conv_args(input, weight, mask, bias, stride, padding, dilation, groups)
    route = _conv_route(*args, groups)
    if route is None:
        x, weight, mask, bias, stride, pads, dilation = args
        return _conv_op(x, weight, mask, bias, list(stride), pads, list(dilation))
    per_model = {"torch": False, "torch_per_model": True}.get(route)  # "reference": the CPU's rule
    y = conv2d_reference(*args, groups, per_model=per_model)
    # On the CPU the next layers (norms, ReLU, pooling, the next conv) run faster on [K, N, O, H, W]
    # in order than on the grouped conv's transposed view, copy included. Measured on the 2-core
    # CPU machine (2 threads, best of 3, view time / in-order time): `evaluate` of a Stack of 4
    # ConvNet-3 width 32 on 1,000 28 x 28 images 1.38x, a DM step on Fashion-MNIST (2 networks, 32
    # real images a class) 1.38x, LMC of 30 alphas as one stack on digits 1.13x, a stacked training
    # pass 0.97-1.02x. (CUDA keeps the view: not measured there.)
    return y.contiguous() if y.device.type == "cpu" else y


def masked_conv2d(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                  stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups)``, fused.

    The gradient with respect to ``weight`` is zero where ``mask`` is 0. ``mask`` is boolean or
    0/1 with the weight's shape. ``input`` is ``[N, C, H, W]`` or unbatched ``[C, H, W]``.

    Example::

        y = masked_conv2d(torch.randn(2, 3, 7, 7), torch.randn(5, 3, 3, 3), torch.ones(5, 3, 3, 3, dtype=torch.bool), padding="same")
    """
    _check_float("weight", weight)
    if weight.dim() != 4:
        raise ValueError(f"weight must be [O, C/groups, R, S] (4-d), got shape {tuple(weight.shape)}")
    _check_float("input", input)
    unbatched = input.dim() == 3
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be [N, C, H, W] or [C, H, W], got shape {tuple(input.shape)}")
    mask = check_mask(mask, weight.shape)
    input, weight, bias = _autocast(input, weight, bias)  # here, so that both paths see the same tensors

    def stacked_args() -> tuple:
        return _stacked_conv_args(input.unsqueeze(0) if unbatched else input, weight.unsqueeze(0), mask.unsqueeze(0),
                                  None if bias is None else bias.unsqueeze(0), stride, padding, dilation, groups)

    def plain() -> Tensor:
        # The one convolution itself, without the stacked form's views (their autograd nodes cost
        # ~0.2 ms of host time per forward and backward at small sizes on the CPU).
        return F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups)

    if groups != 1 or _off_kernel_ground(input, weight):
        _check_devices(input=input, weight=weight, mask=mask, bias=bias)
        # torch would take what the kernels' path refuses (a stride [2], a tensor): checked alike
        _conv_geometry(tuple(weight.shape[-2:]), stride, padding, dilation)
        return _plain_or_named_error(plain, stacked_args)
    args = stacked_args()
    if _conv_route(*args, groups) is not None:
        return plain()
    x, w, m, b, stride, pads, dilation = args
    # squeeze, not [0]: its backward is a view of the incoming gradient, where select's would be a
    # zero-filled copy in NCHW order whatever the layout (a channels_last backward would read NCHW).
    y = _conv_op(x, w, m, b, list(stride), pads, list(dilation)).squeeze(0)
    return y.squeeze(0) if unbatched else y



# ----------------------------------------------------------------------------- interpolated form


def interpolated_conv2d_reference(x, w_a, w_b, m, alphas, bias_a, bias_b, stride, padding, dilation, groups=1):
    """The interpolated conv in plain torch (the K weight sets materialised): x [K or 1, N, C, H, W],
    w_a / w_b / m [1, O, C/g, R, S], alphas [K], biases [1, O] or None -> [K, N, O, OH, OW]."""
    bias = None if bias_a is None else interpolate_weights(bias_a, bias_b, alphas)
    return conv2d_reference(x, interpolate_weights(w_a, w_b, alphas), m, bias, stride, padding, dilation, groups)



def _interpolated_conv_key(x, w_a, m, alphas, bias_a, stride, padding, dilation) -> tuple:
    return _key(x, w_a, m, alphas, extra=("interpolated_conv_fwd", bias_a is None, *stride, *padding, *dilation,
                                          _allow_tf32_conv()))


@torch.library.custom_op("fastmask::interpolated_masked_conv2d", mutates_args=())
def _interpolated_conv_op(x: Tensor, w_a: Tensor, w_b: Tensor, m: Tensor, alphas: Tensor, bias_a: Optional[Tensor],
                          bias_b: Optional[Tensor], stride: List[int], padding: List[int],
                          dilation: List[int]) -> Tensor:
    from fastmask.kernels import masked_conv

    return _pick(_interpolated_conv_key(x, w_a, m, alphas, bias_a, stride, padding, dilation), {
        "triton": lambda: masked_conv.conv_forward(x, w_a, m, bias_a, stride, padding, dilation, _allow_tf32_conv(),
                                                   w_b=_laid_out_like(w_b, w_a),
                                                   bias_b=None if bias_b is None else _laid_out_like(bias_b, bias_a),
                                                   alphas=alphas),
        "torch": lambda: _in_kernel_layout(interpolated_conv2d_reference(x, w_a, w_b, m, alphas, bias_a, bias_b,
                                                                         stride, padding, dilation), x),
    })()


@_interpolated_conv_op.register_fake
def _(x, w_a, w_b, m, alphas, bias_a, bias_b, stride, padding, dilation):
    from fastmask.kernels.masked_conv import output_size, stacked_empty

    O, _, R, S = w_a.shape[1:]
    OH = output_size(x.shape[3], R, stride[0], padding[0], padding[1], dilation[0])
    OW = output_size(x.shape[4], S, stride[1], padding[2], padding[3], dilation[1])
    return stacked_empty((alphas.shape[0], x.shape[1], O, OH, OW), x)



def interpolated_masked_conv2d(input: Tensor, weight_a: Tensor, weight_b: Tensor, mask: Tensor, alphas,
                               bias_a: Optional[Tensor] = None, bias_b: Optional[Tensor] = None,
                               stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Masked conv2d of the K networks on the segment between two weight sets, in one launch:
    ``y[k] = F.conv2d(x[k], ((1 - a_k) * weight_a + a_k * weight_b) * mask, (1 - a_k) * bias_a + a_k * bias_b)``
    with ``a_k = alphas[k]``.

    The interpolated weights are formed inside the kernel's tile loads from one copy of each
    weight set: the K weight sets are never materialised. Forward only (evaluation: no autograd).

    Args:
        input: ``[K, N, C, H, W]`` (one batch per alpha) or ``[N, C, H, W]`` (shared by all K).
        weight_a, weight_b: ``[O, C // groups, R, S]``, one shape and dtype.
        mask: boolean (or 0/1) of the weights' shape, applied to every interpolated weight.
        alphas: ``[K]`` floating (a tensor or a list).
        bias_a, bias_b: ``[O]`` each, or both None.
        stride, padding, dilation, groups: as ``F.conv2d``; padding also ``'same'`` / ``'valid'``.

    Returns ``[K, N, O, OH, OW]``.

    Example::

        wa, wb = torch.randn(16, 3, 3, 3), torch.randn(16, 3, 3, 3)
        m = torch.rand(16, 3, 3, 3) > 0.5
        y = interpolated_masked_conv2d(torch.randn(8, 3, 32, 32), wa, wb, m, torch.linspace(0, 1, 30), padding=1)
    """
    _check_float("input", input)
    mask, alphas = _interpolation_args(weight_a, weight_b, mask, alphas, bias_a, bias_b, 4, "[O, C/groups, R, S]")
    K = alphas.shape[0]
    x = _stacked_conv_input(input, K, "alphas", weight_a.shape[1] * groups, groups)
    _check_devices(input=input, weight_a=weight_a, weight_b=weight_b, mask=mask, bias_a=bias_a, bias_b=bias_b)
    stride, pads, dilation = _conv_geometry(tuple(weight_a.shape[-2:]), stride, padding, dilation)
    x, w_a, w_b, bias_a, bias_b = _autocast(x, weight_a, weight_b, bias_a, bias_b)
    if x.dtype != w_a.dtype:
        raise TypeError(f"input ({x.dtype}) and weight_a ({w_a.dtype}) must have one dtype")
    w_a, w_b, m = w_a.unsqueeze(0), w_b.unsqueeze(0), mask.unsqueeze(0)
    bias_a = None if bias_a is None else bias_a.unsqueeze(0)
    bias_b = None if bias_b is None else bias_b.unsqueeze(0)
    if groups != 1 or _off_kernel_ground(x, w_a):
        return interpolated_conv2d_reference(x, w_a, w_b, m, alphas, bias_a, bias_b, stride, pads, dilation, groups)
    alphas = alphas.float().contiguous()
    op = lambda: _interpolated_conv_op(x, w_a, w_b, m, alphas, bias_a, bias_b, list(stride), pads,  # noqa: E731
                                       list(dilation))
    if _chosen_torch(_interpolated_conv_key(x, w_a, m, alphas, bias_a, stride, pads, dilation), op) is not None:
        return interpolated_conv2d_reference(x, w_a, w_b, m, alphas, bias_a, bias_b, stride, pads, dilation)
    return op()
