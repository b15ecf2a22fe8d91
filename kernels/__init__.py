"""fastmask's Triton kernels, installed as ``fastmask.kernels``.

Each module holds one op's kernels and launchers; ``fastmask.ops`` holds one wrapper module per
kernel module (the op's torch reference and the choice between the two) and is the only part of
fastmask that imports them, lazily, so that fastmask imports and runs on the torch reference path
where triton is missing. The kernels import nothing from ``fastmask``: this package sits below it.
"""
import os


def interpreter_on() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
