"""The pipeline's configuration: typed dataclasses, YAML files, ``key=value`` overrides, presets.

Every section is a plain dataclass; ``PipelineConfig`` holds them all: the shared sections
(``seed``, ``device``, ``data``, ``model``, ``train``, ``inner_train``) and one per stage of the
registry (``fastmask.stages``), its ``Config`` under its name. ``load_config`` starts
from a preset, applies a YAML file, then ``section.key=value`` overrides (values parsed as YAML:
``imp.rounds=3``, ``distill.method=dsa``, ``train.milestones=[0.5,0.75]``). An unknown key or a
value of the wrong type is a ``ValueError`` that names it, raised before any work starts.

Example::

    cfg = load_config(preset="digits-convnet3", overrides=["imp.rounds=3", "device=cpu"])
    print(to_dict(cfg)["imp"])
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fastmask.stages import STAGES
from fastmask.stages.base import one_of, positive
from fastmask.train import TrainConfig


@dataclasses.dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | synthetic
    # Folder of fashion-mnist / mnist / cifar10 / cifar100 / imagefolder (or $FASTMASK_DATA; fashion-mnist
    # also looks in /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist puts it).
    root: str | None = None
    zca: bool = False
    # Training examples kept: a stratified subset drawn by the run's seed (None: all), for CPU-sized runs.
    # synthetic: the number of training images drawn (None: 1024).
    train_size: int | None = None
    test_size: int = 256  # synthetic only

    def __post_init__(self):
        from fastmask.data import DATASETS

        one_of("name", self.name, DATASETS)
        if self.train_size is not None:
            positive("train_size", self.train_size)


@dataclasses.dataclass
class ModelConfig:
    name: str = "convnet3"
    width: int | None = None  # None: the family's default
    norm: str | None = None  # convnet only: instance | batch | layer | none

    def __post_init__(self):
        from fastmask.models import MODELS

        one_of("name", self.name, MODELS)
        if self.norm is not None:
            one_of("norm", self.norm, ("instance", "batch", "layer", "none"))


@dataclasses.dataclass
class BaseConfig:
    """The sections every stage shares; ``PipelineConfig`` adds one section per registered stage."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # dense training and retraining
    inner_train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # IMP on the distilled set


# The full configuration: the shared sections, then each stage's own (``cfg.imp``, ``cfg.lmc``, ...),
# in the order of the registry.
PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig", [(stage.name, stage.config, dataclasses.field(default_factory=stage.config))
                       for stage in STAGES if stage.config is not None], bases=(BaseConfig,))
PipelineConfig.__module__ = __name__
PipelineConfig.__doc__ = "The pipeline's configuration: the shared sections and one section per stage."


PRESETS: dict[str, dict[str, Any]] = {
    # Real data shipped with scikit-learn; a few minutes on 2 CPU cores.
    "digits-convnet3": {
        "data": {"name": "digits"},
        "model": {"name": "convnet3"},
        "train": {"epochs": 10, "batch_size": 64, "lr": 0.05, "augment": False, "weight_decay": 5e-4},
        "inner_train": {"steps": 100, "batch_size": 100, "lr": 0.01, "augment": False, "schedule": "step"},
        # Distilled with ConvNet-2 width 32: ConvNet-3 pools 8x8 digits down to 1x1, and its 128 channel
        # means are too poor an embedding for DM to beat random real images (README, "Figures").
        "distill": {"method": "dm", "iterations": 300, "num_networks": 2, "batch_real": 32, "width": 32, "depth": 2,
                    "eval_seeds": 3},
        "imp": {"rounds": 5, "retrain_stack": 3},
        "lmc": {"alphas": 11},
        "landscape": {"grid": 7},
        "hessian": {"num_probes": 16, "examples": 256},
    },
    # The study on real data that installs offline (Debian's dataset-fashion-mnist), sized for 2 CPU cores
    # (4 min 43-47 s on 2 idle cores, README "The study"): a 4,000-image training subset, ConvNet-3 width 32,
    # one epoch per training, 3 IMP rounds at rate 0.4 (densities 1, 0.6, 0.36, 0.216), 4 arms x 3 seeds,
    # the study's accuracies and barriers on 1,000 test / 500 training examples. DM as measured to beat
    # random real images (distilled with width-32 networks, 300 iterations, 2 networks, 32 real images).
    "fashion-convnet3": {
        "data": {"name": "fashion-mnist", "train_size": 4000},
        "model": {"name": "convnet3", "width": 32},
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.05, "augment": False, "weight_decay": 5e-4},
        "inner_train": {"steps": 300, "batch_size": 100, "lr": 0.01, "augment": False, "schedule": "step"},
        # measured at train_size 10000: this DM set 79.1 ± 0.2% against random real images 71.8 ± 0.6%
        "distill": {"method": "dm", "iterations": 300, "num_networks": 2, "batch_real": 32, "width": 32,
                    "lr": 3.0, "eval_seeds": 2},
        "imp": {"rounds": 3, "rate": 0.4, "retrain_stack": 4},
        "lmc": {"alphas": 5},
        "landscape": {"grid": 4},
        "hessian": {"num_probes": 8, "examples": 256},
        "study": {"arms": ["real", "distilled", "hybrid", "random"], "seeds": 3, "hybrid_rounds": 1,
                  "train_examples": 500, "test_examples": 1000},
    },
    # The papers' settings (needs the CIFAR-10 python files in data.root or $FASTMASK_DATA).
    "cifar10-convnet3": {
        "data": {"name": "cifar10", "zca": True},
        "model": {"name": "convnet3"},
        "train": {"epochs": 60, "batch_size": 256, "lr": 0.01, "schedule": "cosine"},
        "inner_train": {"steps": 1000, "batch_size": 256, "lr": 0.01, "schedule": "step"},
        "distill": {"method": "dm", "iterations": 20000, "num_networks": 4},
        "imp": {"rounds": 10, "rewind_step": 500},  # a rewind point after pre-training: the Data Diet arms need one
        "lmc": {"alphas": 30},
        "landscape": {"grid": 21},
        "hessian": {"num_probes": 100, "examples": 2048},
        "study": {"arms": ["real", "distilled", "hybrid", "subset", "easy", "random"], "seeds": 3, "hybrid_rounds": 4,
                  "train_examples": 10000},
    },
    "cifar10-resnet18": {
        "data": {"name": "cifar10"},
        "model": {"name": "resnet18"},
        "train": {"epochs": 160, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4, "schedule": "step",
                  "milestones": [0.5, 0.75], "warmup_steps": 0},
        "inner_train": {"steps": 1000, "batch_size": 256, "lr": 0.01, "schedule": "step"},
        "distill": {"method": "dm", "iterations": 20000, "num_networks": 4, "width": 128},
        "imp": {"rounds": 20, "rewind_step": 500},
        "lmc": {"alphas": 30},
        "landscape": {"grid": 21},
        "hessian": {"num_probes": 100, "examples": 2048},
        "study": {"arms": ["real", "distilled", "hybrid", "subset", "easy", "random"], "seeds": 3, "hybrid_rounds": 8,
                  "train_examples": 10000},
    },
    # CIFAR-shaped random data: the benchmark pipeline. Its labels are independent of its pixels, so
    # every set (distilled or random real) tests at chance: the distill stage's comparison is noise here.
    "synthetic-convnet3": {
        "data": {"name": "synthetic", "train_size": 10000, "test_size": 2000},
        "model": {"name": "convnet3"},
        "train": {"epochs": 5, "batch_size": 256, "lr": 0.01},
        "inner_train": {"steps": 200, "batch_size": 100, "lr": 0.01, "schedule": "step"},
        "distill": {"method": "dm", "iterations": 200, "num_networks": 4},
        "imp": {"rounds": 5},
        "lmc": {"alphas": 30},
        "landscape": {"grid": 11},
        "hessian": {"num_probes": 64, "examples": 1024},
    },
}
DEFAULT_PRESET = "digits-convnet3"


def _check_type(value, hint, key: str):
    """``value`` converted to ``hint`` (ints to floats, lists to tuples), or a ValueError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ValueError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key} must hold {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, key) for v, a in zip(value, args))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{key} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _merge(target, values: dict, prefix: str = ""):
    """A copy of dataclass ``target`` with ``values`` (nested dicts) applied, types checked."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(target))
    fields = {f.name for f in dataclasses.fields(target)}
    changes = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in fields:
            raise ValueError(f"unknown config key {key!r}; known keys here: {sorted(fields)}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, key + ".")
        else:
            changes[name] = _check_type(value, hints[name], key)
    try:
        return dataclasses.replace(target, **changes)
    except (TypeError, ValueError) as error:  # a section's own checks (TrainConfig.__post_init__)
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parse error in a few words: what went wrong, and where (1-based line and column)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or type(error).__name__}{where}"


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. imp.rounds=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value {raw!r} is not valid YAML ({_yaml_problem(error)}); "
                         "quote a string, write a list as [1, 2]") from None
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] = ()) -> PipelineConfig:
    """The preset (default ``digits-convnet3``), then the YAML file, then the overrides."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    cfg = _merge(PipelineConfig(), PRESETS[name])
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from None
        try:
            cfg = _merge(cfg, values or {})
        except ValueError as error:
            raise ValueError(f"config file {str(path)!r}: {error}") from None
    for text in overrides:
        cfg = _merge(cfg, _parse_override(text))
    return _checked_across(cfg)


def _checked_across(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` after the checks of a stage's section that need other sections (its ``check_with``)."""
    for stage in STAGES:
        check = getattr(getattr(cfg, stage.name, None), "check_with", None)
        if check is not None:
            check(cfg)
    return cfg


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts (``to_dict``), as
    ``key: old -> new``.

    Example::

        differences({"imp": {"rounds": 5}}, {"imp": {"rounds": 3}})   # ['imp.rounds: 5 -> 3']
    """
    lines = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def to_dict(cfg) -> dict:
    """Plain YAML/JSON-able dict (tuples as lists)."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict) -> PipelineConfig:
    return _checked_across(_merge(PipelineConfig(), values))
