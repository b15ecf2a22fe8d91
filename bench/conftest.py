"""pytest's side of the benchmark harness (``bench/harness.py``): the ``bench`` and ``roofline``
fixtures and the run's environment (the ``headline`` marker is declared in pyproject.toml).

Without a GPU the Triton kernels run in triton's interpreter (set before triton is imported), and
the smoke pass uses one intra-op thread (its tiny shapes only contend with more). A measured CPU
run keeps torch's thread count (``OMP_NUM_THREADS`` sets it) and records it in every row.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import harness

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if harness.kind() == "smoke":
        torch.set_num_threads(1)


@pytest.fixture
def bench(request):
    # Each case compiles its torch.compile contenders afresh: otherwise dynamo's recompile limit
    # (8 per code object) would silently run later cases eagerly, and earlier shapes would turn on
    # dynamic-shape graphs for the rest.
    torch._dynamo.reset()
    return harness.Bench(request.node.name)


@pytest.fixture(scope="session")
def roofline():
    """Measured HBM bandwidth (bytes/s) and bf16/fp32 matmul rates (FLOP/s) of this GPU; None
    without one (the CPU's rows hold ratios only)."""
    if harness.kind() != "gpu":
        return None
    import triton.testing

    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    hbm = 2 * x.numel() / (ms * 1e-3)
    flops = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
        flops[str(dtype).removeprefix("torch.")] = 2 * 8192**3 / (ms * 1e-3)
    info = {"hbm_bytes_per_s": hbm, "matmul_flops": flops}
    harness._record({"bench": "roofline", **info})
    return info


def pytest_sessionfinish(session, exitstatus):
    if harness.rows_recorded() == 0:
        return
    if harness.writes_results():
        print(f"\nbench: results written to {harness.results_path()}")
    else:
        print("\nbench: smoke pass (tiny sizes, nothing timed or written); `make bench` measures")
