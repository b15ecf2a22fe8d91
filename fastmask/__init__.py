"""fastmask: Triton kernels and a PyTorch API for the sparse-network research pipeline."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastmask")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
