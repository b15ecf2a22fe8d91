"""fastmask: Triton kernels and a PyTorch API for the sparse-network research pipeline.

The submodules are imported when first used (``fastmask.ops``, ``fastmask.prune``, ...), so that
``import fastmask`` and ``fastmask --help`` do not pay for torch until it is needed.

Example::

    import fastmask
    model = fastmask.sparsify(my_model)          # Conv2d/Linear -> masked modules, in place
    y = fastmask.ops.masked_conv2d(x, w, mask)   # F.conv2d(x, w * mask), fused
"""
import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastmask")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("backend", "combinations", "data", "distill", "evaluation", "hessian", "landscape", "lmc", "masks",
               "models", "nn", "ops", "optim", "prune", "stack", "train")

__all__ = [*_SUBMODULES, "sparsify", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastmask.{name}")
    if name == "sparsify":
        return importlib.import_module("fastmask.nn").sparsify
    raise AttributeError(f"module 'fastmask' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
