"""fastmask's Triton kernels, installed as ``fastmask.kernels``.

Each module holds one op's kernels and launchers. They are imported lazily by ``fastmask.ops``
so that fastmask imports and runs on the torch reference path where triton is missing.
"""
