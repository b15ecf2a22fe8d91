"""The first hour of a user: ``fastmask --help`` without torch, ``fastmask config``, one-line errors
naming the file, key or argument, ``--force`` starting over, and short reprs of result objects."""
import collections
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from fastmask import cli, pipeline
from fastmask.config import load_config, to_dict
from fastmask.stages import STAGES

from test_data import write_fake_cifar


def fails_with_one_line(capsys, argv, *named):
    """Run ``fastmask argv`` in this process: exit status 2, one line on stderr holding ``named``."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for name in named:
        assert name in err, err
    return err


# ----------------------------------------------------------------------------------------- help


def test_help_does_not_import_torch():
    code = ("import runpy, sys\nsys.argv = ['fastmask', '--help']\ntry:\n    runpy.run_module('fastmask', "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}).stdout
    assert "fastmask config" in out and "usage: fastmask" in out
    assert "``" not in out  # no raw RST
    assert out.strip().endswith("torch imported: False")


def test_run_help_lists_the_presets_and_how_to_see_the_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "digits-convnet3 (default)" in out and "cifar10-resnet18" in out
    assert "fastmask config --preset NAME" in out and "data.root=" in out


def test_config_prints_the_resolved_yaml(capsys):
    assert cli.main(["config", "--preset", "synthetic-convnet3", "imp.rounds=2", "distill.method=dsa"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config("synthetic-convnet3", overrides=["imp.rounds=2", "distill.method=dsa"]))
    assert printed["imp"]["rounds"] == 2 and printed["data"]["name"] == "synthetic"


# ----------------------------------------------------------------------------------------- errors


def test_malformed_yaml_config_file(capsys, tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("imp:\n  rounds: [1\n")
    fails_with_one_line(capsys, ["config", "--config", str(file)], str(file), "not valid YAML", "line")


def test_config_file_with_an_unknown_key_names_the_file_and_key(capsys, tmp_path):
    file = tmp_path / "typo.yaml"
    file.write_text("imp:\n  roundz: 3\n")
    fails_with_one_line(capsys, ["config", "--config", str(file)], str(file), "imp.roundz")


def test_override_that_is_not_yaml(capsys, tmp_path):
    fails_with_one_line(capsys, ["run", "--out", str(tmp_path / "never"), "imp.rounds=[1"], "imp.rounds=[1",
                        "not valid YAML")
    assert not (tmp_path / "never").exists()


def test_out_that_is_a_file(capsys, tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    fails_with_one_line(capsys, ["run", "--out", str(file), "device=cpu"], "--out", str(file))
    assert file.read_text() == "mine"


def test_cifar_file_refused_by_the_restricted_unpickler(capsys, tmp_path):
    folder = write_fake_cifar(tmp_path)[0]
    with open(folder / "data_batch_1", "wb") as file:
        pickle.dump(collections.OrderedDict(data=np.zeros((1, 3072), np.uint8)), file)
    fails_with_one_line(capsys, ["run", "--out", str(tmp_path / "run"), "device=cpu", "data.name=cifar10",
                                 f"data.root={tmp_path}"], "data_batch_1", "collections.OrderedDict")
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_hints_in_config_syntax(capsys, tmp_path):
    fails_with_one_line(capsys, ["run", "--out", str(tmp_path / "run"), "device=cpu", "data.name=mnist",
                                 f"data.root={tmp_path / 'nothing'}"], "data.root=")


@pytest.mark.parametrize("content, says", [("{}", "missing fastmask_version"), ('{"stages": ', "not valid JSON"),
                                           ("[1, 2]", "not a fastmask results file")])
def test_results_json_that_is_not_a_run(capsys, tmp_path, content, says):
    (tmp_path / "results.json").write_text(content)
    fails_with_one_line(capsys, ["report", str(tmp_path)], str(tmp_path / "results.json"), says)


def test_another_config_says_which_keys_differ(capsys, tmp_path):
    cfg = load_config(overrides=["device=cpu"])
    pipeline._claim_folder(tmp_path, cfg, force=False)
    fails_with_one_line(capsys, ["run", "--out", str(tmp_path), "device=cpu", "imp.rounds=2", "lmc.alphas=5"],
                        "imp.rounds: 5 -> 2", "lmc.alphas: 11 -> 5", "--force")


# ----------------------------------------------------------------------------------------- --force


def test_force_removes_every_file_of_the_earlier_run_and_nothing_else(tmp_path):
    cfg = load_config(overrides=["device=cpu"])
    pipeline._claim_folder(tmp_path, cfg, force=False)
    owned = ["experts/buffer/0.safetensors", "report.md", "plots/lmc_dense.png", "results.json", "metrics.jsonl",
             "units/lmc/dense.json", "imp_real/mask_round1.safetensors", "checkpoints/dense.safetensors",
             "distilled.safetensors"]
    for name in owned + ["notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("old")
    other = load_config(overrides=["device=cpu", "distill.width=64"])
    assert pipeline._claim_folder(tmp_path, other, force=True) is False  # a fresh start, not a resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(other)
    assert pipeline._claim_folder(tmp_path, other, force=False) is True  # the same config again: a resume
    assert {"experts", "report.md", "plots"} <= {f for stage in STAGES for f in stage.files} | set(pipeline.SHARED_FILES)


# ----------------------------------------------------------------------------------------- reprs


def short_repr(obj, *numbers):
    text = repr(obj)
    assert len(text) < 400 and text.count("\n") == 0 and "tensor(" not in text and "array(" not in text, text
    for number in numbers:
        assert number in text, text
    return text


def test_result_reprs_are_short_and_hold_the_key_numbers():
    from fastmask import distill, hessian, landscape, lmc, prune, train

    big = {"w": torch.zeros(200, 200)}
    rounds = [{"round": 0, "density": 1.0, "test_accuracy": 0.975}, {"round": 1, "density": 0.8, "test_accuracy": 0.981}]
    short_repr(prune.IMPResult(rounds, [big, big], big), "2 rounds", "0.800: 98.1%", "1.000: 97.5%")
    curve = lmc.InterpolationResult([0.0, 0.5, 1.0], [0.1, 0.4, 0.2], [0.02, 0.10, 0.04])
    short_repr(curve, "3 alphas", "error 7.00%", "loss 0.2500")
    pair = (nn.Linear(300, 300), nn.Linear(300, 300))
    short_repr(lmc.InstabilityResult(pair, curve, curve), "test error 7.00%")
    layer = hessian.LayerSummary(("w",), 40000, 1.0, 0.1, 0.5, 1.0)
    short_repr(hessian.HessianDiag(big, big, 1260.0, 43.0, 16, 40000, 0.03, 2.5, {"": layer}), "1260 ± 43", "16 probes")
    grid = np.linspace(0, 1, 21)
    plane = landscape.LandscapeResult(grid, grid, np.full((21, 21), 0.5), np.full((21, 21), 0.25), {"w0": (0, 0)})
    short_repr(plane, "21 x 21", "25.0%")
    short_repr(train.TrainResult(100, [2.3] * 100, {0: big}, {"test_accuracy": [0.9751, 0.96]}, 6400),
               "100 steps", "0.9751", "6400 examples")
    images = torch.zeros(100, 1, 8, 8)
    syn = distill.SyntheticSet(images, torch.arange(10).repeat_interleave(10), 10, "dm", 10, "digits",
                               torch.zeros(1), torch.ones(1))
    short_repr(syn, "dm of digits", "100 images", "10 per class")


def test_augmentation_follows_the_images_unless_set():
    from fastmask.train import TrainConfig

    assert not TrainConfig().augments((1, 8, 8)) and not TrainConfig().augments((1, 28, 28))
    assert TrainConfig().augments((3, 32, 32))
    assert TrainConfig(augment=True).augments((1, 8, 8)) and not TrainConfig(augment=False).augments((3, 32, 32))
