"""The benchmark harness: one code path for every device, each benchmark with a case table per device.

``FASTMASK_BENCH`` chooses what a run does (read once, when the suite starts):

- ``full`` (the default): this device's cases (a CUDA GPU: CIFAR-sized; the CPU: digits- and
  Fashion-MNIST-sized), every contender, timed side by side in interleaved rounds (A B A B ...);
- ``quick``: the same cases; no ``torch.compile`` contender unless it is the row's baseline, and
  whole runs (a training, an IMP, a pipeline) timed once after their warm-up: what ``make
  gpu-session`` runs in its few minutes;
- ``smoke``: tiny cases, each contender run once and not timed (without a GPU the Triton kernels
  run in the interpreter), to check that the code works; nothing is written unless
  ``FASTMASK_BENCH_RESULTS`` names a folder (the tests' dry run of ``make gpu-session``).

A row holds ratios and the times behind them: for each round the baseline's time over each
contender's, their median and range over the rounds, and each contender's median time. Rows are
written as soon as they are measured to ``<results>/<date>-<gpu>.json`` (a GPU),
``<results>/<date>-cpu-<cpu model>.json`` (the CPU) or ``<results>/<date>-smoke.json``, merged into
the rows an earlier run of the day wrote there (a row replaces the same benchmark case's); the
folder is ``FASTMASK_BENCH_RESULTS`` or ``bench/results``. How times are taken:

- kernel-level calls (``measure``): on a GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed)
  per contender per round; on the CPU the wall time of a batch of calls sized to about
  ``CPU_SAMPLE_S``, per contender per round (calls of ``LONG_CALL_S`` or more each: one call per
  sample, as many rounds as whole runs get);
- whole runs (``measure(..., whole_runs=True)``): one synchronised wall-clock call per contender
  per round.
Every contender runs once before the rounds (compilation, autotuning and the per-shape dispatch
choices are not timed) unless the benchmark warmed it up itself.
"""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

MODES = ("full", "quick", "smoke")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_SAMPLE_S = 0.05  # a CPU sample of kernel-level calls lasts at least this long
LONG_CALL_S = 0.5  # a call this long is timed like a whole run (fewer rounds)
ROUNDS = {  # rounds of interleaved timings: (kernel-level calls, whole runs)
    ("gpu", "full"): (5, 3), ("gpu", "quick"): (3, 1),
    ("cpu", "full"): (7, 3), ("cpu", "quick"): (5, 1),
}
GPU_REP_MS = {"full": 100, "quick": 50}  # do_bench's measuring time per round


def mode() -> str:
    """``FASTMASK_BENCH``: ``full`` (default), ``quick`` or ``smoke``."""
    value = os.environ.get("FASTMASK_BENCH", "full").strip().lower() or "full"
    if value not in MODES:
        raise ValueError(f"FASTMASK_BENCH must be one of {MODES}, got {value!r}")
    return value


def kind() -> str:
    """Which case table runs: ``smoke``, ``gpu`` (a CUDA GPU is present) or ``cpu``."""
    if mode() == "smoke":
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def case(case_id: str, value, *, headline: bool = False):
    """One row of a case table; ``headline`` cases are those ``-m headline`` selects: on a GPU the
    ratios ``make gpu-session`` measures first, on the CPU the batched stages against their loops."""
    return pytest.param(value, id=case_id, marks=[pytest.mark.headline] if headline else [])


def cases(*, gpu, cpu, smoke):
    """This run's kind's (see ``kind``) case table, or any other per-device value (e.g. sizes)."""
    return {"gpu": gpu, "cpu": cpu, "smoke": smoke}[kind()]


def with_backend(name: str, fn: Callable) -> Callable:
    """``fn`` run with ``FASTMASK_BACKEND=name`` (e.g. the Triton kernels alone, past the per-shape
    dispatch), so that it can be timed interleaved with the other contenders."""
    def run():
        previous = os.environ.get("FASTMASK_BACKEND")
        os.environ["FASTMASK_BACKEND"] = name
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["FASTMASK_BACKEND"]
            else:
                os.environ["FASTMASK_BACKEND"] = previous

    return run


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: _median(times) for name, times in samples.items()}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _range(values: list[float]) -> list[float]:
    return [min(values), max(values)] if values else [math.nan, math.nan]


class Bench:
    """What a benchmark test gets as its ``bench`` fixture."""

    def __init__(self, test_name: str):
        self.test_name = test_name
        self.mode = mode()
        self.kind = kind()
        self.smoke = self.kind == "smoke"
        self.quick = self.mode == "quick"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # The Triton kernels are timed on a GPU only: on the CPU they run in the interpreter, which
        # is there to check them (the smoke pass runs them once), not to be fast.
        self.kernels = self.kind in ("gpu", "smoke")

    def rounds(self, whole_runs: bool) -> int:
        return ROUNDS[(self.kind, self.mode)][1 if whole_runs else 0]

    def measure(self, contenders: dict[str, Callable], *, compiled: Iterable[str] = (), baseline: str | None = None,
                whole_runs: bool = False, warmed_up: bool = False, smoke_compiled: bool = False
                ) -> dict[str, list[float]]:
        """Milliseconds per call of each contender, one sample per round, the contenders interleaved.

        ``compiled`` names the ``torch.compile`` contenders: left out in quick mode unless one is
        the ``baseline``, and in smoke mode unless ``smoke_compiled`` (compiling takes seconds per
        case on the CPU: a bench checks it once). Smoke mode runs each contender once and returns
        NaN samples.
        """
        compiled = set(compiled)

        def wanted(name: str) -> bool:
            if name not in compiled:
                return True
            if self.smoke:
                return smoke_compiled
            return not self.quick or name == baseline

        keep = {name: fn for name, fn in contenders.items() if wanted(name)}
        if self.smoke:
            for fn in keep.values():
                fn()
            return {name: [math.nan] for name in keep}
        if not warmed_up:
            for fn in keep.values():
                fn()
        timer = self._run_ms if whole_runs else self._calls_ms
        repeats = {name: 1 if whole_runs else self._calls_per_sample(fn) for name, fn in keep.items()}
        long_calls = self.kind == "cpu" and all(n == 0 for n in repeats.values())
        repeats = {name: max(n, 1) for name, n in repeats.items()}
        samples: dict[str, list[float]] = {name: [] for name in keep}
        for _ in range(self.rounds(whole_runs or long_calls)):
            for name, fn in keep.items():
                samples[name].append(timer(fn, repeats[name]))
        return samples

    def _calls_per_sample(self, fn: Callable) -> int:
        """Calls per CPU sample (about ``CPU_SAMPLE_S``); 0 for a call of ``LONG_CALL_S`` or more."""
        if self.kind == "gpu":
            return 1  # do_bench sizes its own repetitions
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        return 0 if seconds >= LONG_CALL_S else max(1, math.ceil(CPU_SAMPLE_S / max(seconds, 1e-9)))

    def _calls_ms(self, fn: Callable, repeats: int) -> float:
        if self.kind == "gpu":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=GPU_REP_MS[self.mode], return_mode="median"))
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats

    def _run_ms(self, fn: Callable, repeats: int) -> float:
        if self.kind == "gpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.kind == "gpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def peak_memory(self, fn: Callable) -> int | None:
        """Peak CUDA bytes one call of ``fn`` allocated above what was allocated before it (the
        dataset, the other contenders' models); None, without calling ``fn``, off the GPU."""
        if self.kind != "gpu":
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    @staticmethod
    def speedup(samples: dict[str, list[float]], contender: str, against: str) -> float:
        """How many times faster ``contender`` ran than ``against``: the median over rounds of their ratio."""
        return _median([a / c for a, c in zip(samples[against], samples[contender]) if c > 0])

    def row(self, case_text: str, samples: dict[str, list[float]], baseline: str, **extra) -> dict:
        """Record one comparison: per contender its median time and the baseline's time over its
        own, round by round (median and range); ``extra`` fields are stored as given."""
        ratios = {name: [b / t for b, t in zip(samples[baseline], times) if t > 0]
                  for name, times in samples.items() if name != baseline}
        row = {"bench": self.test_name, "case": case_text, "mode": self.mode,
               "median_ms": medians(samples),
               "range_ms": {name: _range(times) for name, times in samples.items()},
               "rounds": max(len(times) for times in samples.values()), "baseline": baseline,
               "speedup_vs_baseline": {name: _median(r) for name, r in ratios.items()},
               "speedup_range": {name: _range(r) for name, r in ratios.items()}, **extra}
        if self.kind == "cpu":
            row["threads"] = torch.get_num_threads()
        if self.kind == "gpu":
            row["autotune"] = os.environ.get("FASTMASK_AUTOTUNE", "full")
        if os.environ.get("FASTMASK_BENCH_SESSION"):  # the run of make gpu-session that measured it
            row["session"] = os.environ["FASTMASK_BENCH_SESSION"]
        _record(row)
        if not self.smoke:
            print(f"\n{self.test_name} {case_text}: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in row["median_ms"].items())
                  + " | " + ", ".join(f"x{v:.2f} vs {baseline} ({k})" for k, v in row["speedup_vs_baseline"].items())
                  + "".join(f" | fastmask x{v:.2f} vs {k.removeprefix('speedup_vs_')}" for k, v in extra.items()
                            if k.startswith("speedup_vs_") and isinstance(v, float)))
        return row


def normwise_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def time_masked_layer(bench: Bench, baselines: dict[str, Callable], fastmask: Callable, forward: Callable,
                      expected: torch.Tensor, smoke_compiled: bool) -> tuple[dict[str, list[float]], dict[str, float]]:
    """A masked layer's forward + backward: ``baselines`` (``prune``, ``masked_weight`` and its
    compiled form ``masked_weight_compiled``) and ``fastmask`` timed together, with the Triton
    kernels alone as ``fastmask_triton`` where kernels run (a GPU, the smoke pass); and each
    fastmask output's (``forward()``) normwise difference from ``expected``."""
    contenders = dict(baselines, fastmask=fastmask)
    outputs = {"fastmask": forward}
    if bench.kernels:  # past the per-shape dispatch
        contenders["fastmask_triton"] = with_backend("triton", fastmask)
        outputs["fastmask_triton"] = with_backend("triton", forward)
    times = bench.measure(contenders, compiled=["masked_weight_compiled"], smoke_compiled=smoke_compiled)
    return times, {name: normwise_difference(output(), expected) for name, output in outputs.items()}


def roofline_fields(roofline: dict | None, rate: float, flops: float, bytes_moved: float, times: dict[str, float],
                    contenders: Iterable[str]) -> dict:
    """The roofline time, max(FLOPs / ``rate``, bytes / measured HBM bandwidth), and each contender's
    fraction of it (its median time over that bound); nothing without a GPU (``roofline`` None)."""
    if roofline is None:
        return {}
    bound = max(flops / rate, bytes_moved / roofline["hbm_bytes_per_s"]) * 1e3
    return {"roofline_ms": bound, "roofline_fraction": {name: bound / times[name] for name in contenders},
            "flops": flops, "bytes_moved": bytes_moved}


def matmul_rate(roofline: dict | None, dtype: torch.dtype) -> float:
    """The measured matmul rate (FLOP/s) of ``dtype`` on this GPU."""
    return math.nan if roofline is None else roofline["matmul_flops"].get(str(dtype).removeprefix("torch."), math.nan)


# ---------------------------------------------------------------------------------------------- results

_rows: list[dict] = []


def results_dir() -> Path:
    return Path(os.environ.get("FASTMASK_BENCH_RESULTS") or RESULTS_DIR)


def writes_results() -> bool:
    """Measured runs write their rows; the smoke pass only into a folder named for it."""
    return kind() != "smoke" or bool(os.environ.get("FASTMASK_BENCH_RESULTS"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


@functools.cache
def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name() -> str:
    if kind() == "gpu" or (kind() == "smoke" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return cpu_model()


def results_path() -> Path:
    today = datetime.date.today().isoformat()
    if kind() == "smoke":
        return results_dir() / f"{today}-smoke.json"
    if kind() == "cpu":
        return results_dir() / f"{today}-cpu-{_slug(cpu_model())}.json"
    return results_dir() / f"{today}-{_slug(torch.cuda.get_device_name(0).removeprefix('NVIDIA '))}.json"


@functools.cache
def _driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:  # no nvidia-smi on the PATH
        return None


def _record(row: dict) -> None:
    """Keep a row and write the results file at once, so a run stopped midway keeps its rows."""
    _rows.append(row)
    if writes_results():
        write_results()


def write_results() -> Path:
    import triton

    path = results_path()
    # A later run's rows replace the same (bench, case) rows of the day's file and join the others.
    ours = {(row["bench"], row.get("case")) for row in _rows}
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [row for row in earlier if (row["bench"], row.get("case")) not in ours] + _rows
    out = {"date": path.name[:10], "kind": kind(), "device": device_name(), "driver": _driver(),
           "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(out, indent=1))
    temporary.replace(path)
    return path


def rows_recorded() -> int:
    return len(_rows)
