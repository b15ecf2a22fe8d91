"""The whole pipeline, end to end: ``fastmask.pipeline.run`` against the eager reference
(``bench.reference.run_reference``) and the reference with its training runs under ``torch.compile``:
wall time per stage (distill, dense, imp, lmc, landscape, hessian, study) and in total.

Cases, on a GPU (CIFAR-shaped synthetic data):
- ``small`` (headline, ``make gpu-session``): ``synthetic-convnet3`` cut to a couple of minutes of
  the eager reference: 2,000 / 1,000 images, one epoch, 20 DM iterations, one IMP round, 10 alphas,
  a 5 x 5 landscape, 8 Hutchinson probes, and the study (``STUDY``: the real, distilled and random
  arms, 2 seeds, barriers and per-example LMC on 256 training examples; fastmask's copies as
  stacks, the reference's one after another);
- ``synthetic-convnet3``: the preset as it is (10,000 / 2,000 images, DM with 4 networks for 200
  iterations, 5 IMP rounds with the real and the distilled inner loop and the random baseline,
  LMC of three networks at 30 alphas, an 11 x 11 landscape, 64 Hutchinson probes);
- ``synthetic-resnet18``: the same with CIFAR ResNet-18 (BatchNorm: LMC also with the statistics
  reset), dense training and retraining shortened to 2 epochs and 32 probes to bound the run time.
  These two run the preset without a study (its default: no arms).
On the CPU ``digits-convnet3`` (ConvNet-3 width 128 on digits) with one IMP round, one epoch per
training, 20 DM iterations, 11 alphas, a 5 x 5 landscape, 8 probes and the study of ``small``,
without the compiled reference (it compiles every training run, minutes on the CPU). The smoke
cases run every stage, the study with one seed, at tiny sizes.

Every contender is timed as a whole run, each in a fresh folder, after a warm-up run of a tiny
version of the same configuration (kernel compilation, autotuning and the dispatch's choices are
not timed; the reference's torch.compile is warmed the same way). The stage times are the
pipelines' own ``timings`` (of the last round); the total is the wall time of the call (data
loading and file writing included). The rows also record a few metrics of both runs: on random
labels both sit at chance, so they check the plumbing, not the learning (tests/test_reference.py
compares them on digits). Target (issue 12): fastmask >= 5x the reference in total on an H100.

Run: .venv/bin/python -m pytest bench/bench_pipeline.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest

from fastmask import pipeline
from fastmask.config import load_config

from bench.harness import case, cases
from bench.reference import STAGES, run_reference

@dataclasses.dataclass(frozen=True)
class PipelineCase:
    name: str
    preset: str
    overrides: tuple = ()  # key=value strings
    compiled: bool = True  # whether the compiled reference is a contender


# A few steps of everything, at the real batch sizes: the warm-up run. For a case with a study, its
# study has two arms but the case's seeds and examples (the shapes of the stacks of copies and of the
# evaluations).
WARMUP = ["imp.rounds=1", "train.epochs=0.05", "inner_train.steps=2", "distill.iterations=2", "distill.eval_seeds=1",
          "lmc.alphas=2", "landscape.grid=2", "hessian.num_probes=2", "hessian.examples=256"]
# The study of the small and the CPU cases: every arm the reference writes but the hybrid (one IMP round).
STUDY = ("study.arms=[real,distilled,random]", "study.seeds=2", "study.train_examples=256")
SMALL = ("data.train_size=2000", "data.test_size=1000", "train.epochs=1", "inner_train.steps=50",
         "distill.iterations=20", "distill.eval_seeds=1", "imp.rounds=1", "lmc.alphas=10", "landscape.grid=5",
         "hessian.num_probes=8", "hessian.examples=256") + STUDY
# Tiny sizes, to check that every stage of both pipelines runs.
SMOKE = ("data.train_size=64", "data.test_size=32", "train.epochs=1", "train.batch_size=16", "inner_train.steps=2",
         "inner_train.batch_size=10", "distill.iterations=1", "distill.images_per_class=1", "distill.num_networks=1",
         "distill.eval_seeds=1", "imp.rounds=1", "lmc.alphas=3", "landscape.grid=3", "hessian.num_probes=2",
         "hessian.examples=16", "hessian.batch_size=8", "study.arms=[real,distilled,random]", "study.seeds=1",
         "study.train_examples=16")
GPU = [PipelineCase("small", "synthetic-convnet3", SMALL),
       PipelineCase("synthetic-convnet3", "synthetic-convnet3"),
       PipelineCase("synthetic-resnet18", "synthetic-convnet3", ("model.name=resnet18", "train.epochs=2",
                                                                 "hessian.num_probes=32"))]
CPU = [PipelineCase("digits-convnet3", "digits-convnet3", ("imp.rounds=1", "train.epochs=1", "distill.iterations=20",
                                                           "distill.eval_seeds=1", "lmc.alphas=11", "landscape.grid=5",
                                                           "hessian.num_probes=8") + STUDY, compiled=False)]
SMOKE_CASES = [PipelineCase("small", "synthetic-convnet3", SMOKE + ("model.width=8",), compiled=False),
               PipelineCase("synthetic-resnet18", "synthetic-convnet3",
                            SMOKE + ("model.name=resnet18", "model.width=4"), compiled=False)]
CASES = cases(**{kind: [case(c.name, c, headline=c is items[0] and kind != "cpu") for c in items]
                 for kind, items in (("gpu", GPU), ("cpu", CPU), ("smoke", SMOKE_CASES))})


def _metrics(results: dict) -> dict:
    stages = results["stages"]
    return {"dense_test_accuracy": stages["dense"]["test_accuracy"],
            "imp_last_test_accuracy": {inner: rounds[-1]["test_accuracy"] for inner, rounds in stages["imp"].items()},
            "barrier_error": {network: entry["barrier_error"] for network, entry in stages["lmc"].items()},
            "hessian_trace": {network: entry["trace"] for network, entry in stages["hessian"].items()},
            "study_last_test_accuracy": {arm: entries[-1]["test_accuracy_mean"]
                                         for arm, entries in stages["study"].get("arms", {}).items()}}


@pytest.mark.parametrize("c", CASES)
def bench_pipeline_end_to_end(bench, tmp_path, c):
    overrides = list(c.overrides)
    described = f"{c.name} ({c.preset}{', ' if c.overrides else ''}{' '.join(c.overrides)})"
    folders = itertools.count()

    def run_fastmask(extra, folder):
        return json.loads((pipeline.run(preset=c.preset, out=tmp_path / folder, overrides=overrides + extra,
                                        quiet=True) / "results.json").read_text())

    def reference(compile_):
        return lambda extra, folder: run_reference(load_config(c.preset, None, overrides + extra), tmp_path / folder,
                                                   compile=compile_)

    runs = {"reference": reference(False), "reference_compiled": reference(True), "fastmask": run_fastmask}
    if not c.compiled:
        del runs["reference_compiled"]
    if not bench.smoke:
        warmup = WARMUP + (["study.arms=[real,random]"] if any(o.startswith("study.arms") for o in c.overrides) else [])
        for name, run in runs.items():
            run(warmup, f"{name}-warmup")
    results = {}
    # Each timed call in a fresh folder: the same folder again would resume a finished run.
    contenders = {name: (lambda name=name, run=run: results.__setitem__(name, run([], f"{name}-{next(folders)}")))
                  for name, run in runs.items()}
    totals = bench.measure(contenders, compiled=["reference_compiled"], whole_runs=True, warmed_up=True)
    metrics = {name: _metrics(r) for name, r in results.items()}
    for stage in STAGES:
        stage_ms = {name: [math.nan if bench.smoke else results[name]["timings"][stage] * 1e3] for name in totals}
        extra = {"speedup_vs_reference_compiled": bench.speedup(stage_ms, "fastmask", "reference_compiled")} \
            if "reference_compiled" in stage_ms else {}
        bench.row(f"{c.name} stage {stage}", stage_ms, baseline="reference", **extra)
    extra = {"speedup_vs_reference_compiled": bench.speedup(totals, "fastmask", "reference_compiled")} \
        if "reference_compiled" in totals else {}
    bench.row(f"{c.name} total", totals, baseline="reference", **extra,
              configuration=described, metrics=metrics)
    for r in results.values():
        assert set(r["timings"]) == set(STAGES)
    for inner in ("real", "distilled", "random"):
        assert ([x["density"] for x in results["fastmask"]["stages"]["imp"][inner]]
                == [x["density"] for x in results["reference"]["stages"]["imp"][inner]])
    ours, theirs = (results[name]["stages"]["study"].get("arms", {}) for name in ("fastmask", "reference"))
    assert set(ours) == set(theirs)
    for arm in ours:
        assert [x["density"] for x in ours[arm]] == [x["density"] for x in theirs[arm]]
