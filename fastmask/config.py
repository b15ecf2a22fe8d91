"""The pipeline's configuration: typed dataclasses, YAML files, ``key=value`` overrides, presets.

Every section is a plain dataclass; ``PipelineConfig`` holds them all. ``load_config`` starts
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

        _choice("name", self.name, DATASETS)
        if self.train_size is not None:
            _positive("train_size", self.train_size)


@dataclasses.dataclass
class ModelConfig:
    name: str = "convnet3"
    width: int | None = None  # None: the family's default
    norm: str | None = None  # convnet only: instance | batch | layer | none

    def __post_init__(self):
        from fastmask.models import MODELS

        _choice("name", self.name, MODELS)
        if self.norm is not None:
            _choice("norm", self.norm, ("instance", "batch", "layer", "none"))


@dataclasses.dataclass
class DistillConfig:
    method: str = "dm"  # dm | dsa | dc | idc | mtt | random
    images_per_class: int = 10
    iterations: int = 200
    num_networks: int = 4  # random networks per iteration, run as one stack
    batch_real: int = 256  # real images per class and network in a matching step
    width: int | None = None  # ConvNet width used while distilling (None: the model's)
    depth: int | None = None  # ConvNet depth used while distilling (None: 3, ConvNet-3)
    eval_seeds: int = 3  # networks trained from scratch on the set to report its accuracy

    def __post_init__(self):
        _choice("method", self.method, ("dm", "dsa", "dc", "idc", "mtt", "random"))
        _positive("images_per_class", self.images_per_class)
        _positive("num_networks", self.num_networks)
        _positive("batch_real", self.batch_real)
        _positive("eval_seeds", self.eval_seeds)
        if self.depth is not None:
            _positive("depth", self.depth)


@dataclasses.dataclass
class IMPConfig:
    rounds: int = 5
    rate: float = 0.2
    rewind_step: int = 0
    scope: str = "global"  # global | layer
    random_baseline: bool = True  # random (layer-wise) masks at the same densities, retrained
    retrain_stack: int = 4  # masks retrained at once as one stack

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must lie in (0, 1), got {self.rate}")
        _choice("scope", self.scope, ("global", "layer"))
        _positive("retrain_stack", self.retrain_stack)
        if self.rounds < 0 or self.rewind_step < 0:
            raise ValueError("rounds and rewind_step must be >= 0")


@dataclasses.dataclass
class LMCConfig:
    alphas: int = 30
    seeds: tuple[int, int] = (1, 2)  # the two copies' data orders
    bn_reset: bool = True  # also report BatchNorm-reset (REPAIR) curves when the model has BatchNorm

    def __post_init__(self):
        if self.alphas < 2:
            raise ValueError(f"alphas must be >= 2 (the endpoints), got {self.alphas}")


@dataclasses.dataclass
class LandscapeConfig:
    enabled: bool = True
    grid: int = 11  # points per axis of the plane through the rewind weights and the two LMC copies


@dataclasses.dataclass
class HessianConfig:
    num_probes: int = 64
    examples: int = 512  # training examples the Hessian's mean loss is taken over
    batch_size: int = 256

    def __post_init__(self):
        if self.num_probes < 2:
            raise ValueError(f"num_probes must be >= 2 (for a standard error), got {self.num_probes}")
        _positive("examples", self.examples)
        _positive("batch_size", self.batch_size)


@dataclasses.dataclass
class PipelineConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # dense training and retraining
    inner_train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # IMP on the distilled set
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    imp: IMPConfig = dataclasses.field(default_factory=IMPConfig)
    lmc: LMCConfig = dataclasses.field(default_factory=LMCConfig)
    landscape: LandscapeConfig = dataclasses.field(default_factory=LandscapeConfig)
    hessian: HessianConfig = dataclasses.field(default_factory=HessianConfig)


def _choice(key: str, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {sorted(choices)}, got {value!r}")


def _positive(key: str, value):
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")


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
    # The papers' settings (needs the CIFAR-10 python files in data.root or $FASTMASK_DATA).
    "cifar10-convnet3": {
        "data": {"name": "cifar10", "zca": True},
        "model": {"name": "convnet3"},
        "train": {"epochs": 60, "batch_size": 256, "lr": 0.01, "schedule": "cosine"},
        "inner_train": {"steps": 1000, "batch_size": 256, "lr": 0.01, "schedule": "step"},
        "distill": {"method": "dm", "iterations": 20000, "num_networks": 4},
        "imp": {"rounds": 10},
        "lmc": {"alphas": 30},
        "landscape": {"grid": 21},
        "hessian": {"num_probes": 100, "examples": 2048},
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
    },
    # CIFAR-shaped random data: the benchmark pipeline.
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


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. imp.rounds=3)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
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
        cfg = _merge(cfg, yaml.safe_load(path.read_text()) or {})
    for text in overrides:
        cfg = _merge(cfg, _parse_override(text))
    return cfg


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
    return _merge(PipelineConfig(), values)
