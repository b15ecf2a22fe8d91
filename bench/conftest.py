"""Benchmark harness: CUDA-event medians side by side in one process, one results file per run.

Every benchmark test takes the ``bench`` fixture and calls ``bench.time(fn)`` for each
contender (fastmask, the eager reference, torch.compile of it) and ``bench.row(...)`` to record a
comparison. On a CUDA GPU times are medians of ``triton.testing.do_bench`` (warm-up, L2 flushed
between runs); every row is written to ``bench/results/<date>-<gpu>.json`` as soon as it is
recorded (a run stopped midway keeps what it measured), merged into the rows that an earlier
session of the day wrote there. Without a GPU the same code runs once per contender at the smoke sizes (``bench.smoke``)
so the suite is checked, and nothing is written: timings need a GPU.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # the smoke pass runs tiny shapes, where extra threads only contend

RESULTS_DIR = Path(__file__).parent / "results"
_rows: list[dict] = []


class Bench:
    def __init__(self, test_name: str):
        self.test_name = test_name
        self.smoke = not torch.cuda.is_available()
        self.device = torch.device("cpu" if self.smoke else "cuda")

    def time(self, fn, *, rep_ms: int = 200) -> float:
        """Median milliseconds of ``fn()`` (CUDA events); in smoke mode one run, not timed."""
        if self.smoke:
            fn()
            return float("nan")
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))

    def wall_ms(self, fn) -> float:
        """Wall-clock milliseconds of one call of a long ``fn`` (a stage, a pipeline), synchronised;
        in smoke mode one untimed run."""
        if self.smoke:
            fn()
            return float("nan")
        import time

        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def peak_memory(self, fn) -> int:
        """Peak CUDA bytes that one call of ``fn`` allocated on top of what was allocated before it
        (the dataset, the other contenders' models); 0 in smoke mode."""
        if self.smoke:
            fn()
            return 0
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def row(self, case: str, times_ms: dict[str, float], baseline: str, **extra):
        """Record one comparison; ratios are baseline time over each contender's time."""
        ratios = {name: times_ms[baseline] / t for name, t in times_ms.items() if name != baseline and t > 0}
        row = {"bench": self.test_name, "case": case, "median_ms": times_ms, "baseline": baseline,
               "speedup_vs_baseline": ratios, **extra}
        _record(row)
        if not self.smoke:
            print(f"\n{self.test_name} {case}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times_ms.items())
                  + " | " + ", ".join(f"x{v:.2f} vs {baseline} ({k})" for k, v in ratios.items())
                  + "".join(f" | fastmask x{v:.2f} vs {k.removeprefix('speedup_vs_')}" for k, v in extra.items()
                            if k.startswith("speedup_vs_") and isinstance(v, float)))


@pytest.fixture
def bench(request):
    # Each case compiles its torch.compile contenders afresh: otherwise dynamo's recompile limit
    # (8 per code object) would silently run later cases eagerly, and earlier shapes would turn on
    # dynamic-shape graphs for the rest.
    torch._dynamo.reset()
    return Bench(request.node.name)


@pytest.fixture(scope="session")
def roofline():
    """Measured HBM bandwidth (bytes/s) and bf16/fp32 matmul rates (FLOP/s) of this device."""
    if not torch.cuda.is_available():
        return {"hbm_bytes_per_s": float("nan"), "matmul_flops": {}}
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
    _record({"bench": "roofline", **info})
    return info


def _record(row: dict) -> None:
    """Keep a row; on a GPU write the results file at once, so a run stopped midway keeps its rows."""
    _rows.append(row)
    if torch.cuda.is_available():
        _write_results()


def pytest_sessionfinish(session, exitstatus):
    if not torch.cuda.is_available():
        print("\nbench: smoke pass only (no CUDA GPU); timings need a GPU, nothing written")
    elif _rows:
        print(f"\nbench: results written to {_results_path()}")


def _results_path() -> Path:
    slug = torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-")
    return RESULTS_DIR / f"{datetime.date.today().isoformat()}-{slug}.json"


@functools.cache
def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:  # no nvidia-smi on the PATH
        return "unknown"


def _write_results() -> None:
    import triton

    path = _results_path()
    # The suite is often run a few files at a time (one command each): a later session's rows
    # replace the same (bench, case) rows of the day's file and join the others.
    ours = {(row["bench"], row.get("case")) for row in _rows}
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [row for row in earlier if (row["bench"], row.get("case")) not in ours] + _rows
    out = {
        "date": path.name[:10], "device": torch.cuda.get_device_name(0), "driver": _driver(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "rows": rows,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
