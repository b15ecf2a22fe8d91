"""Which implementation runs an op: the Triton kernels or the plain-PyTorch reference.

``FASTMASK_BACKEND`` chooses, read at every call so tests and users can switch at run time:

- ``auto`` (default): CUDA tensors go to the Triton kernels when triton imports; everything
  else (CPU tensors, float64, no triton) goes to the torch reference.
- ``triton``: always the kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` (set before
  triton is first imported), which runs the kernels in triton's numpy interpreter.
- ``torch``: always the reference.

Example::

    FASTMASK_BACKEND=torch python train.py      # compare against the reference path
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fastmask.kernels import interpreter_on  # the kernels' own test (they import nothing from fastmask)

BACKENDS = ("auto", "triton", "torch")


# Looked up once, without importing triton, so TRITON_INTERPRET can still be set afterwards.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed (it is a Linux-only dependency)."""
    return _TRITON_INSTALLED


def selected() -> str:
    """The backend asked for through ``FASTMASK_BACKEND`` (``auto`` when unset)."""
    choice = os.environ.get("FASTMASK_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"FASTMASK_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def use_triton(*tensors: torch.Tensor, kernel_dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> bool:
    """Whether an op on ``tensors`` runs the Triton kernels (True) or the torch reference.

    ``kernel_dtypes`` are the floating dtypes the kernels support; other dtypes (float64)
    always take the reference path, where cuDNN and the CPU handle them exactly.
    """
    choice = selected()
    if choice == "torch":
        return False
    supported = all(t.dtype in kernel_dtypes for t in tensors if t.is_floating_point())
    if choice == "auto":
        return supported and all(t.is_cuda for t in tensors) and triton_available()
    if not triton_available():
        raise RuntimeError("FASTMASK_BACKEND=triton but triton does not import; install triton or use 'auto'")
    if not all(t.is_cuda for t in tensors) and not interpreter_on():
        raise RuntimeError(
            "FASTMASK_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return supported


def describe() -> dict:
    """Versions, device and backend, as printed by ``fastmask info``."""
    import platform

    import fastmask

    info = {
        "fastmask": fastmask.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "backend": selected(),
        "triton_interpreter": interpreter_on(),
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    return info
