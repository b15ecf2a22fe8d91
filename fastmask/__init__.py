"""fastmask: Triton kernels and a PyTorch API for the sparse-network research pipeline.

Example::

    import fastmask
    model = fastmask.sparsify(my_model)          # Conv2d/Linear -> masked modules, in place
    y = fastmask.ops.masked_conv2d(x, w, mask)   # F.conv2d(x, w * mask), fused
"""
from importlib.metadata import PackageNotFoundError, version

from fastmask import (backend, combinations, data, distill, evaluation, hessian, landscape, lmc, masks, models, nn, ops,
                      optim, prune, stack, train)
from fastmask.nn import sparsify

try:
    __version__ = version("fastmask")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["backend", "combinations", "data", "distill", "evaluation", "hessian", "landscape", "lmc", "masks", "models",
           "nn", "ops", "optim", "prune", "sparsify", "stack", "train", "__version__"]
