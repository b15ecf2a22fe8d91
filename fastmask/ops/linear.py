"""Masked linear, for one model, a stack of K models, or the K networks between two weight sets:
the wrapper of ``fastmask.kernels.masked_matmul``.

``masked_linear(x, w, m)`` is ``F.linear(x, w * m)`` with the same gradients (the weight's
gradient is zero where the mask is 0); ``stacked_masked_linear`` runs K models in one launch;
``interpolated_masked_linear`` (forward only) runs the K networks ``(1 - alpha_k) * a + alpha_k * b``,
forming each interpolated masked weight inside the kernel's tile loads. Where each call runs: see
``fastmask.ops``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmask.masks import check as check_mask
from fastmask.ops._common import (_allow_tf32_matmul, _autocast, _check_devices, _check_float, _chosen_torch,
                                  _interpolation_args, _key, _laid_out_like, _off_kernel_ground,
                                  _one_batch_if_expanded, _pick, _plain_or_named_error, interpolate_weights)


# ----------------------------------------------------------------------------- torch reference


def linear_reference(x, w, m, bias):
    """Stacked masked linear in plain torch: x [K or 1, B, in], w [K, out, in] -> [K, B, out]."""
    y = torch.matmul(x, (w * m).transpose(1, 2))
    return y if bias is None else y + bias[:, None, :]



# ----------------------------------------------------------------------------- linear op


def _linear_key(x, w, m, bias) -> tuple:
    return _key(x, w, m, extra=("linear_fwd", bias is None, _allow_tf32_matmul()))


@torch.library.custom_op("fastmask::stacked_masked_linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, m: Tensor, bias: Optional[Tensor]) -> Tensor:
    from fastmask.kernels import masked_matmul

    return _pick(_linear_key(x, w, m, bias), {
        "triton": lambda: masked_matmul.linear_forward(x, w, m, bias, _allow_tf32_matmul()),
        "torch": lambda: linear_reference(x, w, m, bias),
    })()


@_linear_op.register_fake
def _(x, w, m, bias):
    return x.new_empty((w.shape[0], x.shape[1], w.shape[1]))


@torch.library.custom_op("fastmask::stacked_masked_linear_backward", mutates_args=())
def _linear_backward_op(grad: Tensor, x: Tensor, w: Tensor, m: Tensor, need_x: bool,
                        need_w: bool) -> tuple[Tensor, Tensor]:
    from fastmask.kernels import masked_matmul

    tf32 = _allow_tf32_matmul()

    def triton_grads():
        gx = gw = grad.new_empty(0)
        if need_x:
            gx = masked_matmul.linear_grad_input(grad, w, m, tf32)
            gx = gx.sum(0, keepdim=True) if x.shape[0] == 1 and w.shape[0] > 1 else gx
        if need_w:
            gw = masked_matmul.linear_grad_weight(grad, x, m, tf32)
        return gx, gw

    def torch_grads():
        gx = gw = grad.new_empty(0)
        if need_x:
            gx = torch.matmul(grad, w * m)
            gx = gx.sum(0, keepdim=True) if x.shape[0] == 1 and w.shape[0] > 1 else gx
        if need_w:
            gw = torch.matmul(grad.transpose(1, 2), x) * m
        return gx, gw

    key = _key(grad, x, w, m, extra=("linear_bwd", need_x, need_w, tf32))
    return _pick(key, {"triton": triton_grads, "torch": torch_grads})()


@_linear_backward_op.register_fake
def _(grad, x, w, m, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0)), (w.new_empty(w.shape) if need_w else w.new_empty(0))


def _linear_setup(ctx, inputs, output):
    x, w, m, bias = inputs
    ctx.save_for_backward(x, w, m)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, w, m = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True (double backward): stay differentiable
        gx = torch.matmul(grad, w * m) if need_x else None
        if gx is not None and x.shape[0] == 1 and w.shape[0] > 1:
            gx = gx.sum(0, keepdim=True)
        gw = torch.matmul(grad.transpose(1, 2), x) * m if need_w else None
    else:
        gx, gw = _linear_backward_op(grad, x, w, m, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
    gb = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, gw, None, gb


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _stacked_linear_input(input: Tensor, K: int, holder: str, in_features: int) -> Tensor:
    """``input`` as ``[K or 1, B, in]``, checked against K models (held by ``holder``) of ``in_features`` inputs."""
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be [K, B, in] or [B, in], got shape {tuple(input.shape)}")
    x = input if input.dim() == 3 else input.unsqueeze(0)
    if x.shape[0] not in (1, K):
        raise ValueError(f"input holds {x.shape[0]} models but {holder} holds {K}")
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features but weight expects {in_features}")
    return _one_batch_if_expanded(x)


def _stacked_linear_args(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> tuple:
    """A stacked linear's arguments checked (errors name the argument) and brought to the op's form:
    (x [K or 1, B, in], weight, boolean mask, bias)."""
    _check_float("input", input)
    _check_float("weight", weight)
    if weight.dim() != 3:
        raise ValueError(f"weight must be [K, out, in] (3-d), got shape {tuple(weight.shape)}")
    K, out_features, in_features = weight.shape
    x = _stacked_linear_input(input, K, "weight", in_features)
    if bias is not None and tuple(bias.shape) != (K, out_features):
        raise ValueError(f"bias must have shape {(K, out_features)}, got {tuple(bias.shape)}")
    _check_devices(input=input, weight=weight, mask=mask, bias=bias)
    mask = check_mask(mask, weight.shape, stacked=True)
    x, weight, bias = _autocast(x, weight, bias)
    for name, t in (("input", x), ("bias", bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name} ({t.dtype}) and weight ({weight.dtype}) must have one dtype")
    return x, weight, mask, bias


def _plain_linear(x, weight, mask, bias) -> bool:
    """Whether a checked stacked linear runs as plain torch ops rather than its custom op: off the
    kernels' ground (CPU, float64, functorch), or where the dispatch chose torch (see _chosen_torch)."""
    return (_off_kernel_ground(x, weight)
            or _chosen_torch(_linear_key(x, weight, mask, bias), lambda: _linear_op(x, weight, mask, bias)) is not None)


def stacked_masked_linear(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Masked linear of K models at once: ``y[k] = F.linear(x[k], weight[k] * mask[k], bias[k])``.

    Args:
        input: ``[K, B, in]`` (one batch per model) or ``[B, in]`` (shared by all K).
        weight: ``[K, out, in]``; mask: boolean (or 0/1) of that shape or ``[1, out, in]``.
        bias: ``[K, out]`` or None.

    Returns ``[K, B, out]``, computed in one kernel launch.
    """
    args = _stacked_linear_args(input, weight, mask, bias)
    return linear_reference(*args) if _plain_linear(*args) else _linear_op(*args)


def masked_linear(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(input, weight * mask, bias)``, fused; the weight's gradient is zero where ``mask`` is 0.

    ``input`` is ``[..., in]``; ``mask`` is boolean or 0/1 with the weight's shape ``[out, in]``.

    Example::

        y = masked_linear(torch.randn(4, 10), torch.randn(3, 10), torch.rand(3, 10) > 0.9)   # [4, 3]
    """
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in] (2-d), got shape {tuple(weight.shape)}")
    _check_float("input", input)
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension")
    mask = check_mask(mask, weight.shape)
    lead = input.shape[:-1]
    input, weight, bias = _autocast(input, weight, bias)  # here, so that both paths see the same tensors

    def stacked_args() -> tuple:
        return _stacked_linear_args(input.reshape(1, -1, input.shape[-1]), weight.unsqueeze(0), mask.unsqueeze(0),
                                    None if bias is None else bias.unsqueeze(0))

    def plain() -> Tensor:  # the one linear itself, without the stacked form's views (as masked_conv2d)
        return F.linear(input, weight * mask, bias)

    if _off_kernel_ground(input, weight):
        _check_devices(input=input, weight=weight, mask=mask, bias=bias)
        if bias is not None and bias.shape != weight.shape[:1]:  # F.linear would broadcast it
            stacked_args()
        return _plain_or_named_error(plain, stacked_args)
    args = stacked_args()
    if _plain_linear(*args):
        return plain()
    return _linear_op(*args).reshape(*lead, weight.shape[0])



# ----------------------------------------------------------------------------- interpolated form


def interpolated_linear_reference(x, w_a, w_b, m, alphas, bias_a, bias_b):
    """The interpolated linear in plain torch: x [K or 1, B, in], w_a / w_b / m [1, out, in],
    alphas [K], biases [1, out] or None -> [K, B, out]."""
    bias = None if bias_a is None else interpolate_weights(bias_a, bias_b, alphas)
    return linear_reference(x, interpolate_weights(w_a, w_b, alphas), m, bias)



def _interpolated_linear_key(x, w_a, m, alphas, bias_a) -> tuple:
    return _key(x, w_a, m, alphas, extra=("interpolated_linear_fwd", bias_a is None, _allow_tf32_matmul()))


@torch.library.custom_op("fastmask::interpolated_masked_linear", mutates_args=())
def _interpolated_linear_op(x: Tensor, w_a: Tensor, w_b: Tensor, m: Tensor, alphas: Tensor, bias_a: Optional[Tensor],
                            bias_b: Optional[Tensor]) -> Tensor:
    from fastmask.kernels import masked_matmul

    return _pick(_interpolated_linear_key(x, w_a, m, alphas, bias_a), {
        "triton": lambda: masked_matmul.interpolated_linear_forward(
            x, w_a, _laid_out_like(w_b, w_a), m, bias_a, None if bias_b is None else _laid_out_like(bias_b, bias_a),
            alphas, _allow_tf32_matmul()),
        "torch": lambda: interpolated_linear_reference(x, w_a, w_b, m, alphas, bias_a, bias_b),
    })()


@_interpolated_linear_op.register_fake
def _(x, w_a, w_b, m, alphas, bias_a, bias_b):
    return x.new_empty((alphas.shape[0], x.shape[1], w_a.shape[1]))



def interpolated_masked_linear(input: Tensor, weight_a: Tensor, weight_b: Tensor, mask: Tensor, alphas,
                               bias_a: Optional[Tensor] = None, bias_b: Optional[Tensor] = None) -> Tensor:
    """Masked linear of the K networks on the segment between two weight sets, in one launch:
    ``y[k] = F.linear(x[k], ((1 - a_k) * weight_a + a_k * weight_b) * mask, (1 - a_k) * bias_a + a_k * bias_b)``.

    Args:
        input: ``[K, B, in]`` (one batch per alpha) or ``[B, in]`` (shared by all K).
        weight_a, weight_b: ``[out, in]``; mask: boolean (or 0/1) of that shape; alphas: ``[K]``.
        bias_a, bias_b: ``[out]`` each, or both None.

    Returns ``[K, B, out]``. Forward only; the K weight sets are formed in the tile loads.

    Example::

        y = interpolated_masked_linear(torch.randn(4, 10), torch.randn(3, 10), torch.randn(3, 10),
                                       torch.rand(3, 10) > 0.5, [0.0, 0.5, 1.0])        # [3, 4, 3]
    """
    _check_float("input", input)
    mask, alphas = _interpolation_args(weight_a, weight_b, mask, alphas, bias_a, bias_b, 2, "[out, in]")
    x = _stacked_linear_input(input, alphas.shape[0], "alphas", weight_a.shape[1])
    _check_devices(input=input, weight_a=weight_a, weight_b=weight_b, mask=mask, bias_a=bias_a, bias_b=bias_b)
    x, w_a, w_b, bias_a, bias_b = _autocast(x, weight_a, weight_b, bias_a, bias_b)
    if x.dtype != w_a.dtype:
        raise TypeError(f"input ({x.dtype}) and weight_a ({w_a.dtype}) must have one dtype")
    w_a, w_b, m = w_a.unsqueeze(0), w_b.unsqueeze(0), mask.unsqueeze(0)
    bias_a = None if bias_a is None else bias_a.unsqueeze(0)
    bias_b = None if bias_b is None else bias_b.unsqueeze(0)
    if _off_kernel_ground(x, w_a):
        return interpolated_linear_reference(x, w_a, w_b, m, alphas, bias_a, bias_b)
    alphas = alphas.float().contiguous()
    op = lambda: _interpolated_linear_op(x, w_a, w_b, m, alphas, bias_a, bias_b)  # noqa: E731
    if _chosen_torch(_interpolated_linear_key(x, w_a, m, alphas, bias_a), op) is not None:  # see _chosen_torch
        return interpolated_linear_reference(x, w_a, w_b, m, alphas, bias_a, bias_b)
    return op()
