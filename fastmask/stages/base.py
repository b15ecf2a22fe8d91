"""The stage contract: what a pipeline stage is (``Stage``), what it runs with (``Context``), what
its report section gets (``ReportContext``), and the checks its config section uses.

A stage is one module of ``fastmask.stages`` that defines:

- ``Config``: the dataclass of its section of the pipeline config (``cfg.<name>``), or none;
- ``run(ctx: Context) -> dict``: its result, stored as ``results.json["stages"][<name>]``; it may
  read earlier stages' results (``ctx.results["stages"]``) and files (through the functions the
  earlier stage's module provides), and writes its own files under ``ctx.folder``;
- ``report(result: dict, ctx: ReportContext) -> list[str]``: the Markdown lines of its section of
  ``report.md`` (under the heading ``## <title>``), drawing its plots into ``ctx.plots``;
- ``STAGE = Stage(...)``, the line the registry (``fastmask.stages.STAGES``) lists.

A stage resumes itself: the pipeline skips finished stages, and inside one a stage keeps its
units of work (``fastmask.distributed.map_units``) or its own state files so that a rerun
continues where a kill stopped it. Only rank 0 writes shared files (``fastmask.distributed``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from fastmask import distributed, io, models
from fastmask.data import DataSplits


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage, as the registry lists it.

    ``name``: its key in ``results.json`` (``stages``, ``timings``), its config section and the
    progress line; ``title``: its name for humans (the report's heading); ``files``: what it writes
    in the run folder besides the shared ``checkpoints``, ``plots`` and ``units`` (removed when a run
    starts over with ``--force``); ``summary``: the line printed when it ends (its headline numbers).
    """

    name: str
    title: str
    run: Callable[["Context"], dict]
    report: Callable[[dict, "ReportContext"], list[str]]
    config: Optional[type] = None
    files: tuple[str, ...] = ()
    summary: Optional[Callable[[dict], str]] = None  # its result's headline numbers, in one line


@dataclasses.dataclass
class Context:
    """What a stage runs with: the run folder, the full config, the device and the data, the
    results so far (``results["stages"]`` holds every finished stage's result)."""

    folder: Path
    cfg: object  # fastmask.config.PipelineConfig
    device: torch.device
    splits: DataSplits
    results: dict
    progress: bool = True  # progress bars (rank 0 only)

    def path(self, *parts: str) -> Path:
        """``folder/parts...``, its parent folder created."""
        path = self.folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, event: dict) -> None:
        """Append ``event`` (with the time) to ``metrics.jsonl`` (rank 0 only)."""
        if not distributed.is_main():
            return
        file = self.path("metrics.jsonl")
        lines = file.read_text() if file.exists() else ""
        io.write_text(file, lines + json.dumps({"time": time.time(), **event}) + "\n")

    def model_options(self) -> dict:
        """The configured model's options (``model.width``, ``model.norm``) that are set."""
        model = self.cfg.model
        return {k: v for k, v in (("width", model.width), ("norm", model.norm)) if v is not None}

    def build_model(self) -> nn.Module:
        """The configured model, initialised from the run's seed, on the run's device."""
        torch.manual_seed(self.cfg.seed)
        train = self.splits.train
        return models.create(self.cfg.model.name, train.num_classes, train.image_shape,
                             **self.model_options()).to(self.device)


@dataclasses.dataclass
class ReportContext:
    """What a stage's report section gets besides its result: the run folder, its ``plots`` folder,
    and the whole ``results.json`` (other stages' results)."""

    folder: Path
    plots: Path
    results: dict

    def subject(self) -> str:
        """The words each plot's title ends with (``fastmask.plots.subject``): network, data, run."""
        from fastmask import plots

        config = self.results["config"]
        return plots.subject(self.folder, config["model"]["name"], config["data"]["name"])


def one_of(key: str, value, choices) -> None:
    """A config value that must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {sorted(choices)}, got {value!r}")


def positive(key: str, value) -> None:
    """A config count that must be at least 1."""
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")
