"""The kernels' wrappers: every Triton kernel of ``fastmask.kernels`` is reached through here.

One wrapper module per kernel module: ``conv`` (masked conv2d, on ``kernels.masked_conv``),
``linear`` (masked linear, on ``kernels.masked_matmul``), ``hutchinson`` (Rademacher probes and
the fused accumulation of the Hessian's Hutchinson estimate, on ``kernels.hutchinson``),
``optimizer_step`` (the fused masked SGD / AdamW step, on ``kernels.masked_optim``). A wrapper
holds its op's plain-PyTorch reference (the CPU path and the tests' oracle) and the choice between
the two (``fastmask.backend``); an op that is a function of tensors is a ``torch.library`` custom
op, so autograd and ``torch.compile`` see one op. No other module of fastmask imports
``fastmask.kernels``. One op has no kernel: ``pool`` (``avg_pool2x2``, ConvNet's 2 x 2 average
pooling), a faster CPU form of plain torch ops behind an autograd.Function, ``F.avg_pool2d``
everywhere else (``torch.compile`` sees ``F.avg_pool2d``).

``masked_conv2d(x, w, m)`` is ``F.conv2d(x, w * m)`` and ``masked_linear(x, w, m)`` is
``F.linear(x, w * m)``, with the same gradients (the weight's gradient is zero where the mask
is 0). The stacked forms run K models of one architecture in one kernel launch. The
interpolated forms (``interpolated_masked_conv2d`` / ``interpolated_masked_linear``, forward only)
run the K networks ``(1 - alpha_k) * a + alpha_k * b`` between two weight sets, forming each
interpolated masked weight inside the kernel's tile loads (linear mode connectivity, ``fastmask.lmc``).

Where each call runs (see ``fastmask.backend``):

- the torch reference (``F.conv2d`` / matmul on ``w * m``) on the CPU, in float64, for
  ``groups > 1``, and inside torch.func transforms (vmap, grad, jvp), where plain torch ops
  compose natively;
- otherwise the Triton kernels, through ops registered with ``torch.library`` so that
  ``torch.compile`` traces through them. On CUDA with ``FASTMASK_BACKEND=auto`` each shape is
  timed once against cuDNN/cuBLAS on the pre-masked weight and the faster is kept, so a user is
  never slower than eager.

Example::

    import torch, fastmask.ops as ops
    x, w = torch.randn(8, 3, 32, 32), torch.randn(16, 3, 3, 3)
    m = torch.rand_like(w) > 0.5
    y = ops.masked_conv2d(x, w, m, padding=1)                      # [8, 16, 32, 32]
    ys = ops.stacked_masked_conv2d(x, w.expand(4, -1, -1, -1, -1), m, padding="same")  # [4, 8, 16, 32, 32]
"""
from fastmask.ops import conv, hutchinson, linear, optimizer_step, pool
from fastmask.ops._common import interpolate_weights
from fastmask.ops.conv import (conv2d_reference, interpolated_conv2d_reference, interpolated_masked_conv2d, masked_conv2d,
                               stacked_masked_conv2d)
from fastmask.ops.linear import (interpolated_linear_reference, interpolated_masked_linear, linear_reference, masked_linear,
                                 stacked_masked_linear)
from fastmask.ops.pool import avg_pool2x2

__all__ = ["masked_conv2d", "stacked_masked_conv2d", "interpolated_masked_conv2d", "conv2d_reference",
           "interpolated_conv2d_reference", "masked_linear", "stacked_masked_linear", "interpolated_masked_linear",
           "linear_reference", "interpolated_linear_reference", "interpolate_weights", "avg_pool2x2", "conv", "linear",
           "hutchinson", "optimizer_step", "pool"]
