"""The whole pipeline, end to end: ``fastmask.pipeline.run`` against the eager reference
(``bench.reference.run_reference``) and the reference with its training runs under ``torch.compile``:
wall time per stage (distill, dense, imp, lmc, landscape, hessian) and in total, on CIFAR-shaped
synthetic data:

- ``synthetic-convnet3``: the preset as it is (10,000 / 2,000 images, DM with 4 networks for 200
  iterations, 5 IMP rounds with the real and the distilled inner loop and the random baseline,
  LMC of three networks at 30 alphas, an 11 x 11 landscape, 64 Hutchinson probes);
- ``synthetic-resnet18``: the same with CIFAR ResNet-18 (BatchNorm: LMC also with the statistics
  reset), dense training and retraining shortened to 2 epochs and 32 probes to bound the run time.

Every contender runs once in a fresh folder after a warm-up run of a tiny version of the same
configuration (kernel compilation, autotuning and the dispatch's choices are not timed; the
reference's torch.compile is warmed the same way). The stage times are the pipelines' own
``timings``; the total is the wall time of the call (data loading and file writing included).
The rows also record a few metrics of both runs: on random labels both sit at chance, so they
check the plumbing, not the learning (tests/test_reference.py compares them on digits).
Target (issue 12): fastmask >= 5x the reference in total on an H100.

Run: .venv/bin/python -m pytest bench/bench_pipeline.py -o python_files='bench_*.py' -o python_functions='bench_*' -s
"""
from __future__ import annotations

import json

import pytest

from fastmask import pipeline
from fastmask.config import load_config

from bench.reference import STAGES, run_reference

PRESET = "synthetic-convnet3"
CASES = {
    "synthetic-convnet3": [],
    "synthetic-resnet18": ["model.name=resnet18", "train.epochs=2", "hessian.num_probes=32"],
}
# A few steps of everything, at the real batch sizes: the warm-up run.
WARMUP = ["imp.rounds=1", "train.epochs=0.05", "inner_train.steps=2", "distill.iterations=2", "distill.eval_seeds=1",
          "lmc.alphas=2", "landscape.grid=2", "hessian.num_probes=2", "hessian.examples=256"]
# Without a GPU: tiny sizes, to check that every stage of both pipelines runs.
SMOKE = ["data.train_size=64", "data.test_size=32", "train.epochs=1", "train.batch_size=16", "inner_train.steps=2",
         "inner_train.batch_size=10", "distill.iterations=1", "distill.images_per_class=1", "distill.num_networks=1",
         "distill.eval_seeds=1", "imp.rounds=1", "lmc.alphas=3", "landscape.grid=3", "hessian.num_probes=2",
         "hessian.examples=16", "hessian.batch_size=8"]


def _metrics(results: dict) -> dict:
    stages = results["stages"]
    return {"dense_test_accuracy": stages["dense"]["test_accuracy"],
            "imp_last_test_accuracy": {inner: rounds[-1]["test_accuracy"] for inner, rounds in stages["imp"].items()},
            "barrier_error": {network: entry["barrier_error"] for network, entry in stages["lmc"].items()},
            "hessian_trace": {network: entry["trace"] for network, entry in stages["hessian"].items()}}


@pytest.mark.parametrize("case", list(CASES))
def bench_pipeline_end_to_end(bench, tmp_path, case):
    overrides = list(CASES[case])
    if bench.smoke:
        overrides += SMOKE + (["model.width=4"] if "resnet" in case else ["model.width=8"])

    def run_fastmask(extra, folder):
        return json.loads((pipeline.run(preset=PRESET, out=tmp_path / folder, overrides=overrides + extra,
                                        quiet=True) / "results.json").read_text())

    def reference(compile_):
        return lambda extra, folder: run_reference(load_config(PRESET, None, overrides + extra), tmp_path / folder,
                                                   compile=compile_)

    contenders = {"reference": reference(False), "reference_compiled": reference(True), "fastmask": run_fastmask}
    if bench.smoke:
        del contenders["reference_compiled"]  # compiling takes minutes on the CPU (checked in bench_train)
    totals, results = {}, {}
    for name, run in contenders.items():
        if not bench.smoke:
            run(WARMUP, f"{name}-warmup")
        totals[name] = bench.wall_ms(lambda: results.setdefault(name, run([], name)))
    metrics = {name: _metrics(r) for name, r in results.items()}
    for stage in STAGES:
        stage_ms = {name: float("nan") if bench.smoke else r["timings"][stage] * 1e3 for name, r in results.items()}
        extra = {"speedup_vs_reference_compiled": stage_ms["reference_compiled"] / stage_ms["fastmask"]} \
            if "reference_compiled" in stage_ms and stage_ms["fastmask"] > 0 else {}
        bench.row(f"{case} stage {stage}", stage_ms, baseline="reference", **extra)
    extra = {"speedup_vs_reference_compiled": totals["reference_compiled"] / totals["fastmask"]} \
        if "reference_compiled" in totals else {}
    bench.row(f"{case} total", totals, baseline="reference", **extra, overrides=overrides, metrics=metrics)
    for r in results.values():
        assert set(r["timings"]) == set(STAGES)
    for inner in ("real", "distilled", "random"):
        assert ([x["density"] for x in results["fastmask"]["stages"]["imp"][inner]]
                == [x["density"] for x in results["reference"]["stages"]["imp"][inner]])
