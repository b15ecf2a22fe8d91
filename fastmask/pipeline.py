"""``fastmask run``: the registered stages (``fastmask.stages``: distill -> dense -> IMP (real and
distilled inner loops, random baseline) -> LMC of the dense network and both subnetworks -> loss
landscape -> Hessian), in order, into one run folder, then the report.

One run folder holds everything (docs/design.md, "The pipeline and its run folder")::

    config.yaml        the full configuration (a rerun with another config is refused without --force)
    results.json       {"fastmask_version", "config", "device", "stages": {<stage>: result}, "timings",
                       "completed"}, rewritten after every stage
    metrics.jsonl      one line per finished unit of work
    distilled.safetensors, checkpoints/*.safetensors, imp_*/mask_round*.safetensors, units/
    report.md, plots/*.png

Every file is written atomically. A rerun skips the finished stages and resumes inside the
unfinished one (each stage keeps its own units of work and state files), and ends with the same
results (timings aside): every random choice is seeded.

Under ``torchrun --nproc_per_node=N -m fastmask run ...`` (``fastmask.distributed``) every process
runs this same code: dense training and IMP's rounds are data parallel, the retraining of masks
and the per-network LMC, landscape and Hessian work (``units/<stage>/<network>.json``) are spread
over the ranks, distillation runs on every rank (rank 0's set is kept), and only rank 0 writes
shared files. The results equal a single process's up to float summation order (BatchNorm
models: up to the per-process batch statistics).

Example::

    from fastmask import pipeline
    folder = pipeline.run(preset="digits-convnet3", out="runs/demo", overrides=["imp.rounds=3"])
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import yaml

import fastmask
from fastmask import data as data_module
from fastmask import distributed, io, report
from fastmask.config import DEFAULT_PRESET, PipelineConfig, differences, load_config, to_dict
from fastmask.stages import STAGES, Context

# What a run folder holds besides each stage's own files (``Stage.files``): ``--force`` removes
# these and those, and nothing else the folder may hold.
SHARED_FILES = ("results.json", "metrics.jsonl", "checkpoints", "plots", "units", "report.md")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def load_data(cfg: PipelineConfig, device: torch.device) -> data_module.DataSplits:
    options = {"test_size": cfg.data.test_size} if cfg.data.name == "synthetic" else {}
    try:
        return data_module.load(cfg.data.name, cfg.data.root, device=device, train_size=cfg.data.train_size,
                                zca=cfg.data.zca, seed=cfg.seed, **options)
    except FileNotFoundError as error:  # the data functions speak of root=; a run's config calls it data.root
        raise FileNotFoundError(f"{error} (in a run: data.root=FOLDER on the command line, or data: {{root: FOLDER}} "
                                "in the YAML file)") from None


def _start_over(folder: Path):
    """Remove the files of an earlier run from ``folder`` (``--force``): the shared ones, each
    stage's, and config.yaml last, so that a kill midway still leaves a folder a rerun refuses or
    redoes; files the run did not make are left alone."""
    for name in SHARED_FILES + tuple(file for stage in STAGES for file in stage.files) + ("config.yaml",):
        stale = folder / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        elif stale.exists() or stale.is_symlink():
            stale.unlink()


def _claim_folder(folder: Path, cfg: PipelineConfig, force: bool) -> bool:
    """Write config.yaml in a new folder; in an existing one the config must be the same (or, with
    ``force``, the old run's files are removed first, whatever its config). True when the folder
    holds this run already (a rerun resumes it)."""
    config_file = folder / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if force:
        _start_over(folder)
    elif config_file.exists() and config_file.read_text() != text:
        try:
            changed = differences(yaml.safe_load(config_file.read_text()) or {}, to_dict(cfg))
        except yaml.YAMLError:
            changed = ["config.yaml is not valid YAML"]
        raise ValueError(f"{folder} holds a run with another configuration ({'; '.join(changed) or 'config.yaml differs'}"
                         "); choose another --out, or pass --force to start over there")
    resuming = config_file.exists()
    io.write_text(config_file, text)
    return resuming


def run_folder(out=None, preset=None) -> Path:
    """The run folder: ``out``, or ``runs/<preset>`` by default."""
    return Path(out) if out else Path("runs") / (preset or DEFAULT_PRESET)


def _results(folder: Path, cfg: PipelineConfig, device: torch.device) -> dict:
    """The run's results.json so far (rank 0's view, on every rank: every rank resumes alike)."""
    results = distributed.main_only(lambda: report.load_results(folder) if (folder / "results.json").exists() else {
        "fastmask_version": fastmask.__version__, "config": to_dict(cfg),
        "device": {"type": device.type, "name": device_name(device)}, "stages": {}, "timings": {}, "completed": []})
    return distributed.broadcast_object(results)


def _finish(ctx: Context, stage: str, result: dict, seconds: float):
    # Every rank keeps rank 0's result (the one written), so that the next stages agree.
    result, seconds = distributed.broadcast_object((result, seconds))
    ctx.results["stages"][stage] = result
    ctx.results["timings"][stage] = seconds
    ctx.results["completed"].append(stage)
    ctx.log({"stage": stage, "seconds": seconds})
    if distributed.is_main():
        io.write_json(ctx.path("results.json"), ctx.results)


def _announce(text: str) -> None:
    """A line the user sees with or without progress bars (rank 0)."""
    if distributed.is_main():
        print(f"[fastmask] {text}", flush=True)


def run(config_file=None, out=None, preset=None, overrides=(), force: bool = False, quiet: bool = False) -> Path:
    """Run (or resume) the pipeline into ``out``; returns the folder. See the module docstring.

    Prints a line per stage as it starts (``[stage 3/6] imp``) and one when it ends (its time and
    headline numbers), and, on a rerun, which stages are kept.
    """
    cfg = load_config(preset, config_file, list(overrides))
    folder = run_folder(out, preset)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {str(folder)!r} is an existing file; a run folder must be a folder")
    device = resolve_device(cfg.device)
    distributed.init(device)  # under torchrun: join the other processes
    device = distributed.local_device(device)  # and take this process's GPU
    splits = load_data(cfg, device)  # a missing or malformed dataset fails before anything is written
    resuming = distributed.main_only(lambda: _claim_folder(folder, cfg, force))
    distributed.require_shared(folder / "config.yaml")
    ctx = Context(folder, cfg, device, splits, _results(folder, cfg, device),
                  progress=not quiet and distributed.is_main())
    ctx.results["data"] = {"train_size": len(splits.train), "test_size": len(splits.test)}
    done = ctx.results["completed"]
    left = [stage for stage in STAGES if stage.name not in done]
    if resuming:
        kept = f"stages {', '.join(done)} are finished and kept" if done else "no stage had finished"
        where = f"continuing with {left[0].name} from its saved progress" if left else "only the report is rebuilt"
        _announce(f"resuming {folder}: {kept}; {where}")
    for index, stage in enumerate(STAGES, 1):
        if stage.name in done:
            continue
        _announce(f"[stage {index}/{len(STAGES)}] {stage.name}: {stage.title.lower()}")
        start = time.perf_counter()
        result = stage.run(ctx)
        _finish(ctx, stage.name, result, time.perf_counter() - start)
        summary = stage.summary(result) if stage.summary and result else ""
        _announce(f"[stage {index}/{len(STAGES)}] {stage.name} done in {ctx.results['timings'][stage.name]:.1f} s"
                  + (f": {summary}" if summary else ""))
    distributed.main_only(lambda: report.write_report(folder))
    return folder
