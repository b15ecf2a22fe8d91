"""``fastmask run``: the run folder, the results schema, the report, resume after SIGKILL, bad configs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmask import pipeline
from fastmask.stages import STAGES
from helpers import without_times

# A short pipeline on digits: every stage runs, each in a second or two.
SHORT = ["device=cpu", "model.width=8", "train.steps=15", "train.batch_size=64", "inner_train.steps=10",
         "distill.iterations=3", "distill.batch_real=8", "distill.eval_seeds=2", "imp.rounds=2", "lmc.alphas=3",
         "landscape.grid=3", "hessian.num_probes=4", "hessian.examples=64"]

SCHEMA = {
    "distill": {"method", "images_per_class", "num_images", "syn_test_accuracy", "random_test_accuracy",
                "random_test_accuracy_std", "random_test_accuracies", "beats_random", "margin", "seconds"},
    "dense": {"test_accuracy", "seconds"},
    "imp": {"real", "distilled"},
    "lmc": {"dense", "real", "distilled"},
    "hessian": {"dense", "real", "distilled"},
}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastmask", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    pipeline.run(out=folder, overrides=SHORT, quiet=True)
    return folder


def test_results_json_has_the_schema(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    assert {"fastmask_version", "config", "device", "stages", "timings"} <= set(results)
    assert {"type", "name"} <= set(results["device"])
    for stage, keys in SCHEMA.items():
        assert keys <= set(results["stages"][stage]), stage
    for inner in ("real", "distilled"):
        rounds = results["stages"]["imp"][inner]
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert all({"round", "density", "test_accuracy", "train_points_used"} <= set(r) for r in rounds)
        assert rounds[2]["density"] == pytest.approx(0.64, abs=1e-3)
    for network in ("dense", "real", "distilled"):
        assert {"alphas", "test_loss", "test_error", "barrier_loss", "barrier_error"} <= set(results["stages"]["lmc"][network])
        assert {"trace", "trace_stderr", "diag_mean", "diag_max", "num_probes"} <= set(results["stages"]["hessian"][network])
    assert set(results["timings"]) == {stage.name for stage in STAGES}
    distilled = results["stages"]["distill"]  # against random real images, one draw per eval seed
    assert len(distilled["random_test_accuracies"]) == len(distilled["syn_test_accuracies"]) == 2
    assert all(0 <= a <= 1 for a in distilled["random_test_accuracies"])
    assert distilled["beats_random"] == (distilled["syn_test_accuracy"] > distilled["random_test_accuracy"])
    assert distilled["margin"] == pytest.approx(100 * (distilled["syn_test_accuracy"] - distilled["random_test_accuracy"]))


def test_report_and_plots_exist(finished_run):
    report = (finished_run / "report.md").read_text()
    for section in ("Distilled set", "Iterative magnitude pruning", "Linear mode connectivity", "Hessian", "Time per stage"):
        assert section in report
    assert "| distilled (dm) |" in report and "| random real images (a draw per seed) |" in report
    plots = sorted((finished_run / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"accuracy_vs_density.png", "train_points.png", "distilled.png", "hessian_diag.png",
            "lmc_dense.png", "landscape_distilled.png"} <= names
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000
    assert cli("report", str(finished_run)).returncode == 0


def test_rerun_of_a_finished_folder_is_a_no_op(finished_run):
    before = (finished_run / "results.json").read_text()
    pipeline.run(out=finished_run, overrides=SHORT, quiet=True)
    assert (finished_run / "results.json").read_text() == before


def test_sigkill_at_several_points_then_rerun_gives_the_same_results(finished_run, tmp_path):
    expected = without_times(json.loads((finished_run / "results.json").read_text()))
    folder = tmp_path / "killed"
    args = ["run", "--quiet", "--out", str(folder), *SHORT]
    for lines_before_kill in (1, 3, 5):  # after distill, inside IMP, inside LMC (lines of metrics.jsonl)
        process = subprocess.Popen([sys.executable, "-m", "fastmask", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        metrics = folder / "metrics.jsonl"
        while process.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines_before_kill:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for file in folder.rglob("*"):  # every file that exists is complete
            if file.suffix == ".json":
                json.loads(file.read_text())
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                load_file(file)
        assert not list(folder.rglob("*.tmp")) or all(f.name.startswith(".") for f in folder.rglob("*.tmp"))
    finished = cli(*args)
    assert finished.returncode == 0, finished.stderr
    assert without_times(json.loads((folder / "results.json").read_text())) == expected


def test_ctrl_c_prints_one_line_and_a_rerun_resumes(finished_run, tmp_path):
    """SIGINT (Ctrl-C) inside IMP: one line on stderr saying what was kept, exit 130, and the rerun
    finishes with the uninterrupted results."""
    folder = tmp_path / "interrupted"
    args = ["run", "--quiet", "--out", str(folder), *SHORT]
    process = subprocess.Popen([sys.executable, "-m", "fastmask", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # The signal goes in once IMP has started (its stage line; waiting on metrics.jsonl raced with
    # a short IMP finishing first), and a moment into it so that IMP holds a finished round.
    for line in process.stdout:
        if "] imp: " in line:
            break
    metrics = folder / "metrics.jsonl"
    while process.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    # SHORT's sets test at chance, so the distill stage may warn that its set does not beat random real images.
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[fastmask] warning:")]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert "interrupted" in stderr and "distill, dense" in stderr and "rerun the same command to resume" in stderr
    finished = cli(*args)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stdout and "distill, dense are finished and kept" in finished.stdout
    last = len(STAGES)
    assert f"[stage {last}/{last}] {STAGES[-1].name} done" in finished.stdout and f"[stage 1/{last}]" not in finished.stdout
    expected = without_times(json.loads((finished_run / "results.json").read_text()))
    assert without_times(json.loads((folder / "results.json").read_text())) == expected


@pytest.mark.parametrize("args, message", [
    (["imp.roundz=3"], "unknown config key 'imp.roundz'"),
    (["imp.rounds=three"], "imp.rounds must be of type int"),
    (["--preset", "imagenet-vit"], "unknown preset"),
    (["model.name=resnet99"], "model: name must be one of"),
    (["data.name=cifar10", "data.root=/nonexistent/folder"], "cifar"),
    (["--config", "/nonexistent.yaml"], "config file"),
])
def test_bad_config_fails_before_any_work_with_one_line(tmp_path, args, message):
    folder = tmp_path / "never"
    result = cli("run", "--out", str(folder), *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not folder.exists()


def test_another_config_on_an_existing_folder_is_refused_without_force(finished_run, tmp_path):
    result = cli("run", "--out", str(finished_run), *SHORT, "imp.rate=0.3")
    assert result.returncode != 0 and "--force" in result.stderr and "imp.rate: 0.2 -> 0.3" in result.stderr
    config = Path(finished_run / "config.yaml").read_text()
    assert "rate: 0.2" in config


def test_device_name_of_a_cuda_device(monkeypatch):
    """The name results.json records; asked of torch.cuda (faked here: no GPU on the CPU machines)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: asked.append(device) or "NVIDIA H100 80GB HBM3")
    assert pipeline.device_name(torch.device("cuda", 0)) == "NVIDIA H100 80GB HBM3"
    assert asked == [torch.device("cuda", 0)]


def test_distillation_network_options():
    """distill.width / distill.depth reach the random networks; unset, the model's width and ConvNet-3."""
    from fastmask.config import load_config
    from fastmask.stages import distill as distill_stage

    assert distill_stage._distill_model_options(load_config()) == {"width": 32, "depth": 2}  # the digits preset
    cfg = load_config(overrides=["model.width=16", "distill.width=null", "distill.depth=null"])
    assert distill_stage._distill_model_options(cfg) == {"width": 16}
    with pytest.raises(ValueError, match="depth must be >= 1"):
        load_config(overrides=["distill.depth=0"])
    with pytest.raises(ValueError, match="lr must be > 0"):
        load_config(overrides=["distill.lr=0"])


def test_distill_stage_options_reach_the_method(tmp_path):
    """The stage's config keys reach ``distill.distill``: MTT's expert count and epochs among them."""
    from types import SimpleNamespace

    from fastmask.config import load_config
    from fastmask.stages import distill as distill_stage

    def options(*overrides):
        cfg = load_config(overrides=list(overrides))
        return distill_stage._method_options(SimpleNamespace(cfg=cfg, progress=False, path=lambda *p: tmp_path.joinpath(*p)))

    assert options("distill.method=random") == {}
    dm = options("distill.lr=2.5")
    assert (dm["iterations"], dm["lr"], "experts" not in dm) == (300, 2.5, True)
    mtt = options("distill.method=mtt", "distill.mtt_experts=3", "distill.mtt_expert_epochs=4")
    assert (mtt["experts"], mtt["expert_train_epochs"]) == (3, 4)
    assert mtt["buffer"] == str(tmp_path / "experts" / "buffer")
    with pytest.raises(ValueError, match="mtt_experts must be >= 1"):
        load_config(overrides=["distill.mtt_experts=0"])
