"""Test harness: Triton kernels run in the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported; torch does not import triton at
import time, so asking torch about CUDA first is safe.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmask import backend  # noqa: E402
from fastmask.kernels import _alloc  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN (or a sentinel for integers), so an unwritten element fails."""
    with _alloc.poisoned():
        yield


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels on the tests' CPU tensors (the interpreter); skip where triton is
    missing, and on a CUDA machine, where the interpreter is off (the ``gpu`` tests run the kernels there)."""
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    if not backend.interpreter_on():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1 (off where CUDA is present)")
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")


@pytest.fixture
def cudnn_candidates(triton_backend, monkeypatch):
    """Inside the ops, the torch (cuDNN) candidate of every per-shape dispatch, as ``_pick``
    may choose it on CUDA: so its values, gradients and output layout are tested on the CPU too."""
    from fastmask.ops import conv, linear

    for module in (conv, linear):
        monkeypatch.setattr(module, "_pick", lambda key, candidates: candidates["torch"])


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def matmul_tf32():
    """``matmul_tf32(flag)`` sets ``torch.backends.cuda.matmul.allow_tf32`` for one test; restored
    after. (Not monkeypatch: the flag lives behind cuBLASModule's ``__setattr__``, and pytest >= 9
    undoes such a setattr by deleting the attribute, which raises at teardown.)"""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_flag(value: bool):
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = previous
