"""``make gpu-session`` without a GPU: a dry run at the benchmarks' smoke sizes (every phase, the
summary and the files it copies to $OUT), and its parts on their own (a phase killed at its limit
with its children, failing tests read from a JUnit report or from the log, the copies' limits,
the offline set-up, never a non-zero exit)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_session
from bench.gpu_session import Phase, Session

ROOT = Path(__file__).resolve().parent.parent
HEADLINE_BENCHES = {"bench_masked_conv2d", "bench_stacked_masked_conv2d", "bench_masked_optimizer_step_resnet18",
                    "bench_lmc_interpolate", "bench_hessian_diag", "bench_train_two_models",
                    "bench_pipeline_end_to_end", "bench_study_measure"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the session without a GPU")
def test_dry_run_of_make_gpu_session(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    env = dict(os.environ, OUT=str(out), FASTMASK_BENCH_RESULTS=str(results))
    env.pop("FASTMASK_AUTOTUNE", None)
    env.pop("FASTMASK_BENCH", None)
    done = subprocess.run(["make", "--no-print-directory", "gpu-session", f"PYTHON={sys.executable}",
                           "SESSION_ARGS=--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    copied = sorted(path.name for path in out.iterdir())
    assert 5 <= len(copied) <= gpu_session.OUT_FILES, copied
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in copied)
    assert all((out / name).stat().st_size < 16 * 2**20 for name in copied)
    summary = next(out.glob("gpu-session-*-summary.md")).read_text()
    for phase in ("set-up", "1 gpu tests", "2 headline ratios", "3 conv, full autotune"):
        assert re.search(rf"^\| {re.escape(phase)} \| done \|", summary, re.M), (phase, summary)
    assert "FASTMASK_AUTOTUNE=one" in summary and summary.strip() in done.stdout  # printed at the end too
    stamp = re.search(r"# make gpu-session (\S+)", summary).group(1)
    rows = json.loads((out / next(name for name in copied if name.endswith("-smoke.json"))).read_text())["rows"]
    ours = [row for row in rows if row.get("session") == stamp]
    assert {row["bench"].split("[")[0] for row in ours} == HEADLINE_BENCHES
    assert any("autotune=full" in row["case"] for row in ours)  # phase 3
    assert any("autotune=one" in row["case"] for row in ours)  # phase 2
    assert sorted(path.name for path in results.iterdir() if not path.name.endswith(".json")) == \
        sorted(name for name in copied if not name.endswith(".json"))


def _session(tmp_path, budget=60.0, out=None) -> Session:
    return Session(budget, smoke=True, results=tmp_path / "results", out=out)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_phase_at_its_limit_is_killed_with_its_children(tmp_path):
    session = _session(tmp_path)
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(child_pid)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
              "time.sleep(60)")
    started = time.monotonic()
    phase = session.phase("sleepy", [sys.executable, "-c", script], limit=3)
    assert phase.status == "timed out" and time.monotonic() - started < 30
    pid = int(child_pid.read_text())
    time.sleep(0.5)
    assert not _alive(pid)
    assert "started" in session.log_path.read_text()


def test_phase_statuses_from_exit_codes(tmp_path):
    session = _session(tmp_path)
    assert session.phase("ok", [sys.executable, "-c", "pass"], limit=60).status == "done"
    failed = session.phase("bad", [sys.executable, "-c", "import sys; sys.exit(3)"], limit=60)
    assert failed.status == "failed" and failed.detail == "exit code 3"
    assert session.phase("late", [sys.executable, "-c", "pass"], limit=0).status == "skipped"


def test_failing_tests_from_a_junit_report_or_the_log(tmp_path):
    junit = tmp_path / "report.xml"
    junit.write_text("""<?xml version="1.0"?><testsuites><testsuite>
        <testcase classname="tests.test_ops" name="test_a"/>
        <testcase classname="tests.test_ops" name="test_b"><failure message="x"/></testcase>
        <testcase classname="tests.test_lmc" name="test_c[1]"><error message="y"/></testcase>
        <testcase classname="tests.test_lmc" name="test_d"><skipped message="z"/></testcase>
        </testsuite></testsuites>""")
    counts, failed = gpu_session.test_outcomes(junit, "")
    assert counts == "1 passed, 2 failed, 1 skipped"
    assert failed == ["tests.test_ops::test_b", "tests.test_lmc::test_c[1]"]
    log = ("[gw1] [ 50%] FAILED tests/test_ops.py::test_x[bf16]\nFAILED tests/test_lmc.py::test_y - assert 1\n"
           "PASSED tests/test_ops.py::test_z\nERROR tests/test_gpu.py::test_w\n")
    assert gpu_session.test_outcomes(tmp_path / "missing.xml", log) == (
        "", ["tests/test_gpu.py::test_w", "tests/test_lmc.py::test_y", "tests/test_ops.py::test_x[bf16]"])


def test_copies_to_out_keep_its_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "OUT_BYTES", 100)
    session = _session(tmp_path, out=tmp_path / "out")
    big_log = tmp_path / "results" / "big.log"
    big_log.write_text("x" * 150 + "the end")
    big_json = tmp_path / "results" / "big.json"
    big_json.write_text("y" * 200)
    odd = tmp_path / "results" / "odd name?.md"
    odd.write_text("z")
    extra = [tmp_path / "results" / f"f{i}.txt" for i in range(10)]
    for path in extra:
        path.write_text("w")
    session.written = [big_log, big_json, odd, *extra]
    gpu_session.copy_out(session)
    copied = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert copied == sorted(["big.log", "odd_name_.md", *[f"f{i}.txt" for i in range(5)]])  # 8 asked, json too big
    assert (tmp_path / "out" / "big.log").read_text().endswith("the end")
    assert (tmp_path / "out" / "big.log").stat().st_size == 100


def test_set_up_installs_without_an_index(tmp_path, monkeypatch):
    """Where fastmask is not importable from the checkout, pip installs it editable, offline, once."""
    session = _session(tmp_path)
    commands = []
    monkeypatch.setattr(Session, "run", lambda self, command, limit, env=None: commands.append(command) or 0)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no module fastmask"))
    gpu_session.setup(session)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                         "-e", "."]]
    assert session.phases[0].status == "failed"  # still not importable after it, in this fake


def test_never_exits_non_zero(tmp_path, monkeypatch, capsys):
    def broken(session):
        session.phases.append(Phase("1 gpu tests", "failed", 1.0, "2 passed, 1 failed", ["tests.t::test_x"]))
        raise RuntimeError("a crash in the session")

    monkeypatch.setattr(gpu_session, "run_session", broken)
    monkeypatch.setenv("FASTMASK_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_session.main(["--budget", "5"]) == 0
    printed = capsys.readouterr().out
    assert "RuntimeError: a crash in the session" in printed
    assert "| 1 gpu tests | failed | 1 | 2 passed, 1 failed | tests.t::test_x |" in printed
    assert any(path.name.endswith("-summary.md") for path in (tmp_path / "out").iterdir())
