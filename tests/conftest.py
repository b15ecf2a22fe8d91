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
    """Force the Triton kernels (the interpreter on CPU); skip where triton is missing."""
    if not backend.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("FASTMASK_BACKEND", "triton")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
