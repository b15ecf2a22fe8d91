"""``fastmask run``: distill -> dense -> IMP (real and distilled inner loops, random baseline)
-> LMC of the dense network and both subnetworks -> loss landscape -> Hessian -> report.

One run folder holds everything (design.md, "The pipeline and its run folder")::

    config.yaml        the full configuration (a rerun with another config is refused without --force)
    results.json       the stable schema of design.md, rewritten after every stage
    metrics.jsonl      one line per finished unit of work
    distilled.safetensors, checkpoints/*.safetensors, imp_*/mask_round*.safetensors
    report.md, plots/*.png

Every file is written atomically. A rerun skips the finished stages and resumes inside the
unfinished one (dense training from its last saved step, IMP from its last finished round and
retraining), and ends with the same results (timings aside): every random choice is seeded.

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

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import fastmask
from fastmask import data as data_module
from fastmask import distributed, io, models, prune
from fastmask.config import PipelineConfig, load_config, to_dict
from fastmask.train import fit

STAGES = ("distill", "dense", "imp", "lmc", "landscape", "hessian")
NETWORKS = ("dense", "real", "distilled")


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


def load_data(cfg: PipelineConfig, device: torch.device) -> data_module.DataSplits:
    options = {"test_size": cfg.data.test_size} if cfg.data.name == "synthetic" else {}
    return data_module.load(cfg.data.name, cfg.data.root, device=device, train_size=cfg.data.train_size,
                            zca=cfg.data.zca, seed=cfg.seed, **options)


def build_model(cfg: PipelineConfig, splits) -> torch.nn.Module:
    options = {k: v for k, v in (("width", cfg.model.width), ("norm", cfg.model.norm)) if v is not None}
    torch.manual_seed(cfg.seed)
    return models.create(cfg.model.name, splits.train.num_classes, splits.train.image_shape, **options)


class Run:
    """A run folder: its config, results and the stages' files."""

    def __init__(self, folder: Path, cfg: PipelineConfig, device: torch.device, splits, progress: bool):
        self.folder, self.cfg, self.device, self.splits = folder, cfg, device, splits
        self.progress = progress and distributed.is_main()
        results_file = folder / "results.json"
        self.results = json.loads(results_file.read_text()) if results_file.exists() else {
            "fastmask_version": fastmask.__version__, "config": to_dict(cfg),
            "device": {"type": device.type, "name": device_name(device)}, "stages": {}, "timings": {},
            "completed": []}
        self.results = distributed.broadcast_object(self.results)  # rank 0's view: every rank resumes alike

    def path(self, *parts: str) -> Path:
        path = self.folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def finish(self, stage: str, result: dict, seconds: float):
        # Every rank keeps rank 0's result (the one written), so that the next stages agree.
        result, seconds = distributed.broadcast_object((result, seconds))
        self.results["stages"][stage] = result
        self.results["timings"][stage] = seconds
        self.results["completed"].append(stage)
        self.log({"stage": stage, "seconds": seconds})
        if distributed.is_main():
            io.write_json(self.path("results.json"), self.results)

    def log(self, event: dict):
        if not distributed.is_main():
            return
        file = self.path("metrics.jsonl")
        lines = file.read_text() if file.exists() else ""
        io.write_text(file, lines + json.dumps({"time": time.time(), **event}) + "\n")

    def say(self, text: str):
        if not self.progress and distributed.is_main():
            print(f"[fastmask] {text}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _claim_folder(folder: Path, cfg: PipelineConfig, force: bool):
    """Write config.yaml in a new folder; in an existing one the config must be the same."""
    config_file = folder / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if config_file.exists() and config_file.read_text() != text:
        if not force:
            raise ValueError(f"{folder} holds a run with another configuration (config.yaml differs); "
                             "choose another --out, or pass --force to start over there")
        for stale in ("results.json", "metrics.jsonl"):
            (folder / stale).unlink(missing_ok=True)
        import shutil

        for sub in ("checkpoints", "plots", "imp_real", "imp_distilled", "imp_random", "units"):
            shutil.rmtree(folder / sub, ignore_errors=True)
        (folder / "distilled.safetensors").unlink(missing_ok=True)
    io.write_text(config_file, text)


def run(config_file=None, out=None, preset=None, overrides=(), force: bool = False, quiet: bool = False) -> Path:
    """Run (or resume) the pipeline into ``out``; returns the folder. See the module docstring."""
    cfg = load_config(preset, config_file, list(overrides))
    device = resolve_device(cfg.device)
    distributed.init(device)  # under torchrun: join the other processes
    device = distributed.local_device(device)  # and take this process's GPU
    splits = load_data(cfg, device)  # a missing or malformed dataset fails before anything is written
    folder = Path(out) if out else Path("runs") / (preset or "digits-convnet3")
    distributed.main_only(lambda: _claim_folder(folder, cfg, force))
    distributed.require_shared(folder / "config.yaml")
    state = Run(folder, cfg, device, splits, progress=not quiet)
    for stage in STAGES:
        if stage in state.results["completed"]:
            continue
        state.say(f"stage {stage}")
        start = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](state)
        state.finish(stage, result, time.perf_counter() - start)
    from fastmask import report

    distributed.main_only(lambda: report.write_report(folder))
    return folder


# ----------------------------------------------------------------------------- stages


def _distill_model_options(cfg: PipelineConfig) -> dict:
    width = cfg.distill.width or (cfg.model.width if cfg.model.name.startswith("convnet") else None)
    return {name: value for name, value in (("width", width), ("depth", cfg.distill.depth)) if value}


def stage_distill(run: Run) -> dict:
    from fastmask import distill

    cfg = run.cfg
    start = time.perf_counter()
    method_options = {} if cfg.distill.method == "random" else {
        "model_options": _distill_model_options(cfg), "iterations": cfg.distill.iterations,
        "num_networks": cfg.distill.num_networks, "batch_real": cfg.distill.batch_real, "progress": run.progress}
    if cfg.distill.method == "mtt":  # the expert trajectories are kept in the run folder and reused
        method_options["buffer"] = str(run.path("experts", "buffer"))
    synthetic = distill.distill(cfg.distill.method, run.splits.train, cfg.distill.images_per_class, seed=cfg.seed,
                                **method_options)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        synthetic.save(run.path("distilled.safetensors"))
        synthetic.save_grid(run.path("plots", "distilled.png"))
    distributed.barrier()
    synthetic = _synthetic(run)  # every rank distilled the same seeded set; rank 0's copy is the one kept
    scores = distill.evaluate(synthetic, cfg.model.name, run.splits.test, seeds=tuple(range(cfg.distill.eval_seeds)),
                              cfg=cfg.inner_train, model_options=_model_options(cfg))
    return {"method": cfg.distill.method, "images_per_class": cfg.distill.images_per_class,
            "num_images": len(synthetic), "syn_test_accuracy": scores["mean"], "syn_test_accuracy_std": scores["std"],
            "syn_test_accuracies": scores["accuracies"], "seconds": seconds}


def _model_options(cfg: PipelineConfig) -> dict:
    return {k: v for k, v in (("width", cfg.model.width), ("norm", cfg.model.norm)) if v is not None}


def stage_dense(run: Run) -> dict:
    model = build_model(run.cfg, run.splits).to(run.device)
    if distributed.is_main():
        io.save_tensors(run.path("checkpoints", "init.safetensors"), model.state_dict())
    start = time.perf_counter()
    result = fit(model, run.splits.train, run.cfg.train, seed=run.cfg.seed, eval_data=run.splits.test,
                 resume_file=run.path("checkpoints", "dense_training.pt"), save_every=200, progress=run.progress,
                 description="dense")  # data parallel under torchrun
    if distributed.is_main():
        io.save_tensors(run.path("checkpoints", "dense.safetensors"), model.state_dict())
    return {"test_accuracy": result.metrics["test_accuracy"], "test_loss": result.metrics["test_loss"],
            "steps": result.steps, "seconds": time.perf_counter() - start}


def _synthetic(run: Run):
    from fastmask.distill import SyntheticSet

    return SyntheticSet.load(run.path("distilled.safetensors"), device=run.device)


def stage_imp(run: Run) -> dict:
    cfg = run.cfg
    model = build_model(cfg, run.splits).to(run.device)
    out = {}
    for inner in ("real", "distilled"):
        result = prune.imp(model, run.splits, cfg.imp.rounds, cfg.imp.rate, cfg.imp.rewind_step, inner,
                           distilled=_synthetic(run) if inner == "distilled" else None, scope=cfg.imp.scope,
                           inner_cfg=cfg.inner_train, retrain_cfg=cfg.train, seed=cfg.seed,
                           retrain_stack=cfg.imp.retrain_stack, out_dir=run.path(f"imp_{inner}"),
                           progress=run.progress)
        out[inner] = result.rounds
        run.log({"stage": "imp", "inner": inner, "rounds": result.rounds})
    if cfg.imp.random_baseline:
        rewind = io.load_tensors(run.path("imp_real", "rewind.safetensors"), run.device)
        densities = [r["density"] for r in out["real"]]
        masks = [prune.random_masks(model, d, "layer", seed=cfg.seed + i) for i, d in enumerate(densities)]
        accuracies = prune.retrain_masks(model, rewind, masks, run.splits, cfg.train, seed=cfg.seed,
                                         chunk=cfg.imp.retrain_stack, out_dir=run.path("imp_random"),
                                         progress=run.progress)
        out["random"] = [{"round": i, "density": prune.density(m), "test_accuracy": a, "train_points_used": 0}
                         for i, (m, a) in enumerate(zip(masks, accuracies))]
    return out


def _network(run: Run, kind: str):
    """(model, masks, rewind weights) of an analysed network: dense, or the last mask of an IMP run."""
    model = build_model(run.cfg, run.splits).to(run.device)
    if kind == "dense":
        return model, None, io.load_tensors(run.path("checkpoints", "init.safetensors"), run.device)
    folder = run.path(f"imp_{kind}")
    last = run.results["stages"]["imp"][kind][-1]["round"]
    masks = io.load_tensors(folder / f"mask_round{last}.safetensors", run.device) if last else None
    return model, masks, io.load_tensors(folder / "rewind.safetensors", run.device)


def stage_lmc(run: Run) -> dict:
    from fastmask import lmc

    cfg = run.cfg
    has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(cfg, run.splits).modules())

    def analyse(kind: str) -> dict:  # a unit of work: one rank trains and interpolates the pair alone
        model, masks, rewind = _network(run, kind)
        result = lmc.instability(model, masks, rewind, run.splits, cfg.train, seeds=cfg.lmc.seeds, alphas=cfg.lmc.alphas,
                                 bn_reset=cfg.lmc.bn_reset and has_batch_norm, progress=run.progress)
        for name, trained in zip("ab", result.models):
            io.save_tensors(run.path("checkpoints", f"lmc_{kind}_{name}.safetensors"), trained.state_dict())
        entry = {"alphas": result.test.alphas, "test_loss": result.test.loss, "test_error": result.test.error,
                 "barrier_loss": result.test.barrier_loss, "barrier_error": result.test.barrier_error,
                 "train_loss": result.train.loss, "train_error": result.train.error,
                 "train_barrier_loss": result.train.barrier_loss, "train_barrier_error": result.train.barrier_error,
                 "density": prune.density(masks) if masks else 1.0}
        if result.test_reset is not None:
            entry["bn_reset"] = {"test_loss": result.test_reset.loss, "test_error": result.test_reset.error,
                                 "barrier_loss": result.test_reset.barrier_loss,
                                 "barrier_error": result.test_reset.barrier_error}
        return entry

    out = distributed.map_units(NETWORKS, analyse, run.path("units", "lmc"))
    for kind, entry in out.items():
        run.log({"stage": "lmc", "network": kind, "barrier_error": entry["barrier_error"]})
    return out


def _trained_pair(run: Run, kind: str):
    models_ = []
    for name in "ab":
        model = build_model(run.cfg, run.splits).to(run.device)
        model.load_state_dict(io.load_tensors(run.path("checkpoints", f"lmc_{kind}_{name}.safetensors"), run.device))
        models_.append(model)
    return models_


def stage_landscape(run: Run) -> dict:
    from fastmask import landscape

    if not run.cfg.landscape.enabled:
        return {}
    grid = (run.cfg.landscape.grid, run.cfg.landscape.grid)

    def plane(kind: str) -> dict:  # a unit of work, on one rank
        model, masks, rewind = _network(run, kind)
        model.load_state_dict(rewind)  # the rewind state holds all-true mask buffers: set the masks after
        start = prune.apply_masks(model, masks or {})
        model_a, model_b = _trained_pair(run, kind)
        result = landscape.plane(start, model_a, model_b, run.splits.test, grid=grid)
        result.save_plot(run.path("plots", f"landscape_{kind}.png"))
        return result.to_dict()

    return distributed.map_units(NETWORKS, plane, run.path("units", "landscape"))


def stage_hessian(run: Run) -> dict:
    from fastmask import hessian

    cfg = run.cfg.hessian
    examples = min(cfg.examples, len(run.splits.train))
    batches = [(run.splits.train.images[i:i + cfg.batch_size], run.splits.train.labels[i:i + cfg.batch_size])
               for i in range(0, examples, cfg.batch_size)]

    def diagonal(kind: str) -> dict:  # a unit of work, on one rank
        model = _trained_pair(run, kind)[0]
        result = hessian.hessian_diag(model, F.cross_entropy, batches, num_probes=cfg.num_probes, seed=run.cfg.seed)
        io.save_tensors(run.path("checkpoints", f"hessian_{kind}.safetensors"), dict(result.diag))
        return {"trace": result.trace, "trace_stderr": result.trace_stderr, "diag_mean": result.diag_mean,
                "diag_max": result.diag_max, "num_probes": result.num_probes}

    return distributed.map_units(NETWORKS, diagonal, run.path("units", "hessian"))


STAGE_FUNCTIONS = {"distill": stage_distill, "dense": stage_dense, "imp": stage_imp, "lmc": stage_lmc,
                   "landscape": stage_landscape, "hessian": stage_hessian}
