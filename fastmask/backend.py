"""Which implementation runs an op: the Triton kernels or the plain-PyTorch reference.

``FASTMASK_BACKEND`` chooses, read at every call so tests and users can switch at run time:

- ``auto`` (default): CUDA tensors go to the Triton kernels when triton imports; everything
  else (CPU tensors, float64, no triton) goes to the torch reference.
- ``triton``: always the kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` (set before
  triton is first imported), which runs the kernels in triton's numpy interpreter.
- ``torch``: always the reference.

Example::

    FASTMASK_BACKEND=torch python train.py      # compare against the reference path

Importing this module (which every fastmask op, model and stage does) also sets how glibc's
malloc keeps CPU memory that torch frees: see ``keep_freed_cpu_memory``.
"""
from __future__ import annotations

import ctypes
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


# glibc's mallopt parameters (malloc.h) and the values fastmask sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MMAP_MAX = 0  # blocks mapped at once: none, the main arena's blocks come from the heap (the mmap threshold is moot)
_TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps before handing any back to the OS
_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep the CPU memory torch frees, for the next step's tensors to reuse.

    Why: torch allocates a CPU tensor with malloc and frees it when its last reference goes. With
    glibc's default settings a large freed block goes back to the OS (``munmap``, or a trim of the
    heap top), depending on the heap's history, so the next training step's activations are
    fresh pages the kernel faults in and zeroes one by one. Measured on the 2-core CPU machine (2
    torch threads): 60 steps of ConvNet-3 on digits (runs alternating in one process) took
    0.63-0.66 s with about 1,000 minor page faults and 0.80-1.04 s with 80,000-190,000, for
    fastmask's ``fit`` and for a plain torch loop alike; with these settings every run took about
    1,000 or fewer. Blocks of 32 MiB and more (above glibc's largest mmap threshold) are mapped
    and unmapped every time unless mmap is off: ``evaluate`` of ConvNet-3 width 128 on 2,000 images of
    28 x 28 (batches of 128, a 51 MiB first activation) took 1.12-1.20 s with 188,000 faults per
    call and 0.89-0.92 s with none once every block came from the heap (best of 3, two processes
    each). The settings are glibc's own (``mallopt``, as ``MALLOC_MMAP_MAX_=0`` and
    ``MALLOC_TRIM_THRESHOLD_`` would set them at start-up): the main thread's blocks all come from
    the heap (other threads' arenas still map blocks that do not fit their 64 MiB heaps), and only
    free memory at the heap's top beyond 1 GiB goes back to the OS. The cost: the process's
    resident memory stays near its peak instead of falling between steps (what a caching
    allocator does on the GPU), and a large temporary freed below a live block stays resident,
    for reuse, for the life of the process (``ctypes.CDLL("libc.so.6").malloc_trim(0)`` returns
    it; ``FASTMASK_KEEP_CPU_MEMORY=0`` keeps glibc's defaults).

    They are process-wide (the user's own torch code benefits too) and set once, at the first
    import of ``fastmask.backend``. Nothing is set with ``FASTMASK_KEEP_CPU_MEMORY=0`` (glibc's
    malloc left exactly as it is), outside glibc (macOS, musl, Windows), when another allocator
    is preloaded (jemalloc, tcmalloc, mimalloc in ``LD_PRELOAD``: glibc's malloc is not the one
    in use), or when the environment holds glibc's own settings of these
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
    ``MALLOC_MMAP_MAX_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``): those rule.
    Returns whether the settings were made (``fastmask info`` shows it as ``cpu_memory_kept``).

    Example::

        fastmask.backend.CPU_MEMORY_KEPT                     # True on Linux with glibc
        FASTMASK_KEEP_CPU_MEMORY=0 python train.py           # glibc's malloc as it is
    """
    if os.environ.get("FASTMASK_KEEP_CPU_MEMORY", "1").strip() == "0" or _glibc_version() is None:
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    if any(name in os.environ for name in _MALLOC_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        return bool(mallopt(_M_MMAP_MAX, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError):  # an import must never fail over a speed setting
        return False


def _glibc_version() -> str | None:
    """glibc's version string (``"glibc 2.36"``), or None off glibc."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return name if name and name.startswith("glibc") else None


CPU_MEMORY_KEPT = keep_freed_cpu_memory()


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
        "cpu_memory_kept": CPU_MEMORY_KEPT,
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    return info
