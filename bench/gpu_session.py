"""``make gpu-session``: what a short window on a fresh, offline GPU machine should do, in one command
that ends within its budget (8 minutes by default) and never exits non-zero.

One deadline runs across the phases; each phase is a subprocess in its own process group, killed
with its children (pytest-xdist's workers) when its share of the time is up:

0. set-up: fastmask importable from this checkout, else ``pip install --no-index --no-deps
   --no-build-isolation -e .`` (such a machine reaches no package index: nothing is retried);
1. correctness: every ``gpu``-marked test, in parallel workers (pytest-xdist) with a per-test
   timeout (pytest-timeout), each plugin where it is installed;
2. the headline ratios: ``pytest bench -m headline`` in quick mode (``FASTMASK_BENCH=quick``), in
   the order of issue 18 (masked conv, stacked conv, fused optimizers, LMC, Hutchinson, a stack of
   2), then the study's stacks against stacks of one and last the small pipeline (the longest case:
   three whole pipeline runs, each after a warm-up run), each row
   written to the day's results file as soon as it is measured;
3. only if time is left: the first conv case again with the full autotune list
   (``FASTMASK_AUTOTUNE=full``), to see what the single config loses.
``FASTMASK_AUTOTUNE=one`` (one config per kernel kind, nothing timed) holds unless it was set.
At the end a summary: each phase's status (done, timed out, failed with the failing tests) and
the ratios this session measured. The results file, the log, the phases' JUnit reports and the
summary stay in the results folder (``FASTMASK_BENCH_RESULTS`` or bench/results) and, when the
environment variable ``OUT`` names a folder, are copied there (at most 8 files of under 16 MiB).

Usage: python -m bench.gpu_session [--budget SECONDS] [--smoke]
``--smoke`` is the dry run of the tests: the benchmarks at their smoke sizes (``FASTMASK_BENCH=smoke``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480
SETUP_LIMIT_S = 120
TESTS_LIMIT_S = 210  # phase 1 at most; phase 2 keeps what is left
BENCH_RESERVE_S = 150  # time phase 1 leaves for phase 2
FULL_AUTOTUNE_MIN_S = 75  # phase 3 only starts with this much left
CLOSING_S = 20  # for the summary and the copies
TEST_TIMEOUT_S = 150  # per gpu test (pytest-timeout)
BENCH_TIMEOUT_S = 240  # per benchmark case
WORKERS = 8  # pytest-xdist workers (16 cores: compiling Triton kernels is what they do most)
# Phase 2, in the order of issue 18; -m headline picks each file's headline cases.
HEADLINE_FILES = ["bench/bench_masked_conv.py", "bench/bench_optim.py", "bench/bench_lmc.py", "bench/bench_hessian.py",
                  "bench/bench_train.py", "bench/bench_study.py", "bench/bench_pipeline.py"]
FULL_AUTOTUNE_CASE = "bench_masked_conv2d and features.4-at-32x32 and bf16"
BENCH_OPTIONS = ["-o", "python_files=bench_*.py", "-o", "python_functions=bench_*", "-s"]
OUT_FILES, OUT_BYTES = 8, 16 * 2**20 - 4096  # what comes back from $OUT


@dataclasses.dataclass
class Phase:
    name: str
    status: str = "not run"  # done, timed out, failed, skipped or not run
    seconds: float = 0.0
    detail: str = ""
    failed: list[str] = dataclasses.field(default_factory=list)


class Session:
    def __init__(self, budget: float, smoke: bool, results: Path, out: Path | None):
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.smoke = smoke
        self.results = results
        self.out = out
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.results.mkdir(parents=True, exist_ok=True)
        self.log_path = self.results / f"gpu-session-{self.stamp}.log"
        self.log = self.log_path.open("w", buffering=1)
        self.phases: list[Phase] = []
        self.written: list[Path] = [self.log_path]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                        FASTMASK_BENCH_RESULTS=str(results), FASTMASK_BENCH_SESSION=self.stamp)
        self.env.setdefault("FASTMASK_AUTOTUNE", "one")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, command: list[str], limit: float, env: dict | None = None) -> int | None:
        """Run ``command`` in its own process group, its output to the console and the log; its
        return code, or None when ``limit`` seconds ran out (the whole group is then killed)."""
        self.say(f"$ {' '.join(command)}   (at most {limit:.0f} s)")
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        pump = threading.Thread(target=self._pump, args=(process.stdout,), daemon=True)
        pump.start()
        try:
            code = process.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            code = None
        _kill_group(process)  # on a timeout, and any worker left behind holding the GPU
        pump.join(timeout=10)
        return code

    def _pump(self, stream) -> None:
        for line in stream:
            sys.stdout.write(line)
            self.log.write(line)
        sys.stdout.flush()

    def phase(self, name: str, command: list[str], limit: float, junit: Path | None = None,
              env: dict | None = None) -> Phase:
        """Run one phase as ``command`` (a pytest run writing ``junit``) and record its status."""
        phase = Phase(name)
        self.phases.append(phase)
        if limit < 1:
            phase.status, phase.detail = "skipped", "no time left"
            return phase
        started, log_start = time.monotonic(), self.log.tell()
        code = self.run(command, limit, env)
        phase.seconds = time.monotonic() - started
        if junit is not None and junit.exists():
            self.written.append(junit)
        self.log.flush()
        with self.log_path.open(errors="replace") as log:
            log.seek(log_start)
            counts, phase.failed = test_outcomes(junit, log.read())
        phase.detail = counts
        if code is None:
            phase.status = "timed out"
        elif code in (0, 5):  # 5: no test selected
            phase.status = "done"
        else:
            phase.status = "failed"
            if not phase.failed and not counts:
                phase.detail = f"exit code {code}"
        return phase


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to what is left of ``process``'s group (the command and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):  # nothing left
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def test_outcomes(junit: Path | None, log: str) -> tuple[str, list[str]]:
    """("N passed, N failed, ..." or "", the failing tests) from a JUnit report, else from the
    pytest lines of the log (a run killed at its limit writes no report)."""
    if junit is not None and junit.exists():
        try:
            cases = ElementTree.parse(junit).getroot().iter("testcase")
        except ElementTree.ParseError:
            cases = []
        tally = {"passed": 0, "failed": 0, "skipped": 0}
        failed = []
        for testcase in cases:
            outcome = next((child.tag for child in testcase if child.tag in ("failure", "error", "skipped")), None)
            if outcome in ("failure", "error"):
                tally["failed"] += 1
                failed.append(f"{testcase.get('classname', '')}::{testcase.get('name', '')}")
            else:
                tally["skipped" if outcome == "skipped" else "passed"] += 1
        return ", ".join(f"{n} {what}" for what, n in tally.items() if n), failed
    failed = sorted(set(re.findall(r"(?:^|\] )(?:FAILED|ERROR) (\S+::\S+)", log, re.M)))
    return "", failed


def setup(session: Session) -> None:
    """fastmask importable from this checkout, or installed from it without an index."""
    phase = Phase("set-up")
    session.phases.append(phase)
    started = time.monotonic()
    # One interpreter start (importing torch takes seconds): where fastmask comes from, and the versions.
    probe = [sys.executable, "-c", "import pathlib, platform, torch, triton, fastmask, fastmask.kernels; "
             "print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, "
             "'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0)); "
             "print(pathlib.Path(fastmask.__file__).resolve().parent.parent)"]

    def installed_here() -> bool:
        found = subprocess.run(probe, cwd=ROOT, env=session.env, capture_output=True, text=True, timeout=120)
        lines = found.stdout.strip().splitlines()
        session.say(lines[0] if found.returncode == 0 and lines else found.stderr.strip()[-2000:])
        return found.returncode == 0 and Path(lines[-1]).resolve() == ROOT

    try:
        if installed_here():
            phase.status, phase.detail = "done", "fastmask already importable from this checkout"
        else:
            code = session.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                "--no-build-isolation", "-e", "."], min(SETUP_LIMIT_S, session.remaining()))
            ok = code == 0 and installed_here()
            phase.status = "done" if ok else ("timed out" if code is None else "failed")
            phase.detail = "pip install --no-index --no-deps --no-build-isolation -e ."
    except (OSError, subprocess.SubprocessError) as error:
        phase.status, phase.detail = "failed", str(error)
    phase.seconds = time.monotonic() - started


def plugin_options(session: Session, per_test_s: int, workers: int = 0) -> list[str]:
    """pytest-xdist's and pytest-timeout's options, for the plugins that are installed."""
    options = []
    if workers and importlib.util.find_spec("xdist") is not None:
        options += ["-n", str(min(workers, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        options += ["--timeout", str(per_test_s)]
    session.say(f"pytest plugin options: {' '.join(options) or 'none (pytest-xdist and pytest-timeout missing)'}")
    return options


def pytest_command(*arguments: str, junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", *arguments, "-p", "no:cacheprovider", f"--junitxml={junit}"]


def run_session(session: Session) -> None:
    setup(session)
    tests_xml = session.results / f"gpu-session-{session.stamp}-tests.xml"
    limit = min(TESTS_LIMIT_S, session.remaining() - BENCH_RESERVE_S)
    session.phase("1 gpu tests", pytest_command("tests", "-m", "gpu", "-v", "-rfE",
                                                *plugin_options(session, TEST_TIMEOUT_S, WORKERS), junit=tests_xml),
                  limit, tests_xml)
    bench_env = dict(session.env, FASTMASK_BENCH="smoke" if session.smoke else "quick")
    bench_xml = session.results / f"gpu-session-{session.stamp}-bench.xml"
    session.phase("2 headline ratios", pytest_command(*HEADLINE_FILES, *BENCH_OPTIONS, "-m", "headline", "-rfE",
                                                      *plugin_options(session, BENCH_TIMEOUT_S), junit=bench_xml),
                  session.remaining() - CLOSING_S, bench_xml, bench_env)
    full_xml = session.results / f"gpu-session-{session.stamp}-autotune-full.xml"
    if session.remaining() - CLOSING_S >= FULL_AUTOTUNE_MIN_S:
        session.phase("3 conv, full autotune", pytest_command(
            HEADLINE_FILES[0], *BENCH_OPTIONS, "-m", "headline", "-k", FULL_AUTOTUNE_CASE, "-rfE",
            *plugin_options(session, BENCH_TIMEOUT_S), junit=full_xml),
            session.remaining() - CLOSING_S, full_xml, dict(bench_env, FASTMASK_AUTOTUNE="full"))
    else:
        session.phases.append(Phase("3 conv, full autotune", "skipped", detail="not enough time left"))


def session_rows(session: Session) -> tuple[list[Path], list[dict]]:
    """The results files this session wrote into, and its rows in them."""
    files, rows = [], []
    for path in sorted(session.results.glob("*.json")):
        try:
            ours = [row for row in json.loads(path.read_text()).get("rows", []) if row.get("session") == session.stamp]
        except (OSError, ValueError):
            continue
        if ours:
            files.append(path)
            rows += ours
    return files, rows


def summary(session: Session) -> str:
    sys.path.insert(0, str(ROOT))  # bench.table, also when this file is run as a script
    from bench.table import rows_table

    files, rows = session_rows(session)
    session.written[:0] = files
    smoke = "; smoke sizes (dry run)" if session.smoke else ""
    lines = [f"# make gpu-session {session.stamp}", "",
             f"{time.monotonic() - session.start:.0f} s of a {session.deadline - session.start:.0f} s budget; "
             f"FASTMASK_AUTOTUNE={session.env['FASTMASK_AUTOTUNE']}{smoke}",
             "", "| phase | status | seconds | tests | failing |", "|---|---|---|---|---|"]
    for phase in session.phases:
        failing = ", ".join(phase.failed[:20])
        if len(phase.failed) > 20:
            failing += f" and {len(phase.failed) - 20} more"
        lines.append(f"| {phase.name} | {phase.status} | {phase.seconds:.0f} | {phase.detail} | {failing} |")
    lines += ["", f"{len(rows)} rows measured" + (f" into {', '.join(f.name for f in files)}" if files else ""), ""]
    lines += rows_table(rows) if rows else []
    return "\n".join(lines)


def copy_out(session: Session) -> None:
    """The session's files into $OUT: at most OUT_FILES, each under OUT_BYTES (a log's end if longer)."""
    if session.out is None:
        return
    session.out.mkdir(parents=True, exist_ok=True)
    for path in list(dict.fromkeys(session.written))[:OUT_FILES]:
        target = session.out / re.sub(r"[^A-Za-z0-9._-]", "_", path.name)
        size = path.stat().st_size
        if size <= OUT_BYTES:
            shutil.copyfile(path, target)
        elif path.suffix == ".log":
            with path.open("rb") as source:
                source.seek(size - OUT_BYTES)
                target.write_bytes(source.read())
        else:
            session.say(f"{path.name}: {size} bytes, too large to copy to OUT")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole session")
    parser.add_argument("--smoke", action="store_true", help="the benchmarks at smoke sizes (the tests' dry run)")
    args = parser.parse_args(argv)
    results = Path(os.environ.get("FASTMASK_BENCH_RESULTS") or ROOT / "bench" / "results")
    session = Session(args.budget, args.smoke, results, Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    try:
        run_session(session)
    except Exception:  # the summary and the files still come back
        session.say(traceback.format_exc())
    try:
        text = summary(session)
        summary_path = session.results / f"gpu-session-{session.stamp}-summary.md"
        summary_path.write_text(text + "\n")
        session.written.insert(0, summary_path)
        session.say("\n" + text)
    except Exception:
        session.say(traceback.format_exc())
    session.log.flush()
    try:
        copy_out(session)
    except OSError:
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
