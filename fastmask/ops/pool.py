"""2 x 2 average pooling with stride 2 (ConvNet's pooling), in a faster form on the CPU.

``avg_pool2x2(x)`` is ``F.avg_pool2d(x, 2)``. On the CPU torch's average-pooling kernel reads the
input window by window; summing the two columns of each window, then the two rows, as four
strided views added elementwise, gives the same values (up to the order of a 4-term float sum)
in a fraction of the time at ConvNet's sizes. Measured on the 2-core CPU machine (2 torch
threads, float32, best of 3): the forward pass at 64 x 128 x 8 x 8 took 150-234 us against 509-777
us for ``F.avg_pool2d``, at 360 x 128 x 8 x 8 0.8-1.3 ms against 2.9-4.6 ms, at 64 x 128 x 16 x 16
0.56 against 2.1 ms, at 64 x 128 x 4 x 4 105-177 against 130-219 us; at 256 x 128 x 32 x 32 both
took 43-45 ms. The backward pass is torch's own (``avg_pool2d_backward``), so gradients and
double backward (Hutchinson's Hessian-vector products) are those of ``F.avg_pool2d``; forward-mode
AD pools the tangent the same way; the output keeps the input's memory layout (channels_last
too), as ``F.avg_pool2d``'s does. Everywhere else (CUDA, where one pooling kernel is fastest;
other dtypes; odd sizes; inside ``torch.compile`` and torch.func transforms; under
``FASTMASK_BACKEND=torch``, the reference path) it is ``F.avg_pool2d`` itself.

Example::

    y = avg_pool2x2(torch.randn(8, 128, 8, 8))      # [8, 128, 4, 4], as F.avg_pool2d(x, 2)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmask import backend

__all__ = ["avg_pool2x2"]


def _window_sums_quartered(x: Tensor) -> Tensor:
    """The mean of each 2 x 2 window of ``x`` ``[N, C, H, W]`` (H and W even)."""
    n, c, h, w = x.shape
    columns = x.view(n, c, h, w // 2, 2)
    pairs = columns[..., 0] + columns[..., 1]  # [N, C, H, W/2]
    rows = pairs.view(n, c, h // 2, 2, w // 2)
    return (rows[:, :, :, 0] + rows[:, :, :, 1]) * 0.25


class _AvgPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)  # for its shape and layout only: the pooling is linear
        return _window_sums_quartered(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # torch's own backward of F.avg_pool2d(x, 2): differentiable, so double backward works.
        return torch.ops.aten.avg_pool2d_backward(grad, x, [2, 2], [2, 2], [0, 0], False, True, None)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _window_sums_quartered(tangent)  # the pooling is linear


def _fast_form_applies(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.shape[-1] > 0 and x.shape[-2] > 0
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and backend.selected() != "torch")


def avg_pool2x2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2)`` (kernel 2, stride 2, no padding), faster on the CPU (see the module).

    Example::

        pooled = avg_pool2x2(features)      # [N, C, H/2, W/2]
    """
    if _fast_form_applies(x):
        return _AvgPool2x2.apply(x)
    return F.avg_pool2d(x, 2)
