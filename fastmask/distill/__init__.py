"""Dataset distillation: a few synthetic images per class that train a network almost as well as
the real training set.

- ``distill(method, data, images_per_class, ...)`` runs one method and returns a ``SyntheticSet``:
  ``"dm"`` (distribution matching), ``"dsa"`` (gradient matching with differentiable siamese
  augmentation), ``"dc"`` (gradient matching without augmentation), ``"idc"`` (gradient matching
  with multi-formation: each stored image decodes into factor**2 training images; networks trained
  on real data meanwhile), ``"mtt"`` (matching expert training trajectories; the experts train on
  the real data first and are kept in a folder for reuse), ``"random"`` (random real images, the
  baseline every method must beat).
- ``evaluate(synthetic_set, model_name, test_data, seeds)`` trains fresh networks on the
  synthetic set only and reports their test accuracy: mean and standard deviation over seeds,
  as the literature reports distilled sets.
- ``SyntheticSet`` saves to and loads from one safetensors file and draws a PNG grid; IDC returns
  a ``MultiFormationSet`` (the decoded training images, and the stored canvases).

Example::

    import fastmask
    from fastmask import distill

    splits = fastmask.data.load("cifar10", root="~/data", device="cuda")
    syn = distill.distill("dm", splits.train, images_per_class=10, num_networks=4)
    syn.save("dm10.safetensors")
    syn.save_grid("dm10.png")
    print(distill.evaluate(syn, "convnet3", splits.test, seeds=(0, 1, 2)))
    idc = distill.distill("idc", splits.train, images_per_class=10)             # 40 training images per class
    mtt = distill.distill("mtt", splits.train, images_per_class=10, buffer="run/experts")
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from fastmask import models
from fastmask.data import Dataset
from fastmask.distill.augment import DSA, STRATEGY, DSARanges
from fastmask.distill.dm import DistributionMatching, DMConfig
from fastmask.distill.dsa import DSAConfig, GradientMatching
from fastmask.distill.idc import IDC, IDCConfig, MultiFormationSet
from fastmask.distill.mtt import ExpertBuffer, MTTConfig, TrajectoryMatching
from fastmask.distill.synthetic import SyntheticSet, random_real
from fastmask.stack import Stack
from fastmask.train import TrainConfig, fit

METHODS = {"dm": (DistributionMatching, DMConfig), "dsa": (GradientMatching, DSAConfig),
           "dc": (GradientMatching, DSAConfig), "idc": (IDC, IDCConfig), "mtt": (TrajectoryMatching, MTTConfig)}


def distill(method: str, data: Dataset, images_per_class: int, *, model: str = "convnet3",
            model_options: dict | None = None, init: str = "real", seed: int = 0, progress: bool = True,
            **options) -> SyntheticSet:
    """Distil ``data`` (a normalised training set on the device to work on) into
    ``images_per_class`` synthetic images per class with ``method``.

    Args:
        method: ``"dm"``, ``"dsa"``, ``"dc"`` (``"dsa"`` without augmentation), ``"idc"``, ``"mtt"``
            or ``"random"``.
        model, model_options: the architecture of the random networks (``fastmask.models.create``;
            ConvNet-3 by default, as the papers).
        init: ``"real"`` (random real images of each class) or ``"noise"``.
        seed: every random choice follows from it.
        options: the method's config fields (``DMConfig`` / ``DSAConfig`` / ``IDCConfig`` /
            ``MTTConfig``): ``iterations``, ``num_networks`` (K random networks, or K MTT students,
            per iteration, run as one stack), ``batch_real``, ``augment`` (a DSA strategy string or
            None), ``lr``, ``momentum``; for dsa/dc also ``outer_loop``, ``inner_loop``, ``lr_net``,
            ``batch_train``; for idc ``factor``, ``inner_loop``, ``train_images``, ...; for mtt
            ``syn_steps``, ``expert_epochs``, ``max_start_epoch``, ``experts``, ``buffer`` (the
            experts' folder), ...

    Returns a ``SyntheticSet``; for ``"idc"`` a ``MultiFormationSet``, whose ``images`` are the
    decoded training images (``images_per_class * factor**2`` per class).

    Cost: the options default to each paper's CIFAR settings, for a GPU: ``iterations`` is 20,000
    for dm, 1,000 for dsa/dc (each with an inner loop of network updates), 2,000 for idc, 5,000
    for mtt (after training its experts); dm's 20,000 take hours on a CPU. On a CPU pass
    ``iterations`` yourself: dm on digits with ``iterations=300, num_networks=2, batch_real=32,
    model_options={"width": 32, "depth": 2}`` (the ``digits-convnet3`` preset's) took 175 s
    on 2 heavily loaded cores, and beats random real images (README, "Figures").

    Example::

        syn = distill("dm", splits.train, 10, iterations=300, num_networks=2, batch_real=32,
                      model_options={"width": 32, "depth": 2})               # digits, on a CPU
        syn = distill("dsa", splits.train, 10, iterations=1000, model_options={"width": 128})
        mtt = distill("mtt", splits.train, 10, buffer="run/experts", experts=20)
    """
    if method == "random":
        if options:
            raise TypeError(f"distill('random') takes no method options, got {sorted(options)}")
        return random_real(data, images_per_class, seed)
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted([*METHODS, 'random'])}, got {method!r}")
    distiller_type, config_type = METHODS[method]
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"distill({method!r}) got unknown option(s) {unknown}; it accepts {sorted(fields)}")
    if method == "dc":
        if options.get("augment") is not None:
            raise ValueError("method 'dc' is gradient matching without augmentation; use 'dsa' to augment")
        options["augment"] = None
    config = config_type(**options)
    distiller = distiller_type(data, images_per_class, config, model=model, model_options=model_options, init=init,
                               seed=seed)
    return distiller.run(progress=progress)


def evaluation_config(epochs: float = 300, **overrides) -> TrainConfig:
    """The literature's protocol for training on a distilled set: SGD, momentum 0.9, weight decay
    5e-4, lr 0.01 divided by 10 half-way, batch 256, ``epochs`` epochs (300; the papers use 1000
    with DSA augmentation, which ``fit`` does not apply), no augmentation (``augment=True`` gives
    ``fit``'s random crop and flip)."""
    settings = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, epochs=epochs,
                    schedule="step", milestones=(0.5,), gamma=0.1, augment=False)
    return TrainConfig(**{**settings, **overrides})


def evaluate(synthetic_set: SyntheticSet | Sequence[SyntheticSet], model_name: str, test_data: Dataset,
             seeds: Sequence[int] = (0, 1, 2), cfg: TrainConfig | None = None, *, model_options: dict | None = None,
             progress: bool = False) -> dict:
    """Train one fresh ``model_name`` network per seed on ``synthetic_set`` alone (all of them at
    once, as a stack) and test them on ``test_data``.

    ``synthetic_set`` may also be a list of sets, one per seed: seed k's network trains on set k
    alone (the random-real baseline draws one set per seed). ``fit`` trains a stack on one
    dataset, so each set then has a fit of its own.

    ``cfg`` defaults to ``evaluation_config()``. ``test_data`` must be normalised like the
    synthetic set's source. Returns ``{"mean", "std", "accuracies"}`` (fractions, ``accuracies``
    in the order of ``seeds``; ``std`` is the population standard deviation over seeds, as the
    papers' code reports it).

    Example::

        result = evaluate(syn, "convnet3", splits.test, seeds=(0, 1, 2, 3, 4))
        print(f"{100 * result['mean']:.1f} +- {100 * result['std']:.1f}")
        baseline = evaluate([random_real(splits.train, 10, seed=s) for s in (0, 1, 2)], "convnet3", splits.test)
    """
    if not isinstance(test_data, Dataset):
        raise TypeError(f"test_data must be a fastmask.data.Dataset, got {type(test_data).__name__}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if isinstance(synthetic_set, SyntheticSet):
        groups = [(synthetic_set, seeds)]
    elif isinstance(synthetic_set, (list, tuple)) and len(synthetic_set) == len(seeds):
        groups = [(each, [seed]) for each, seed in zip(synthetic_set, seeds)]
    else:
        count = f" of {len(synthetic_set)}" if isinstance(synthetic_set, (list, tuple)) else ""
        raise TypeError(f"synthetic_set must be a SyntheticSet or a list of one per seed ({len(seeds)}), got "
                        f"{type(synthetic_set).__name__}{count}")
    for each, _ in groups:
        _check_evaluable(each, test_data)
    accuracies = []
    for each, group_seeds in groups:
        accuracies += _train_and_test(each, model_name, test_data, group_seeds, cfg, model_options, progress)
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "accuracies": accuracies}


def _check_evaluable(synthetic_set: SyntheticSet, test_data: Dataset) -> None:
    if not isinstance(synthetic_set, SyntheticSet):
        raise TypeError(f"synthetic_set must be a SyntheticSet, got {type(synthetic_set).__name__}")
    syn_shape = tuple(synthetic_set.images.shape[1:])
    if test_data.image_shape != syn_shape or test_data.num_classes != synthetic_set.num_classes:
        raise ValueError(f"test_data holds {test_data.num_classes} classes of shape {test_data.image_shape} but the "
                         f"synthetic set {synthetic_set.num_classes} of shape {syn_shape}")
    same_space = (torch.equal(test_data.mean.cpu(), synthetic_set.mean.cpu())
                  and torch.equal(test_data.std.cpu(), synthetic_set.std.cpu())
                  and (test_data.zca is None) == (synthetic_set.zca is None))
    if not same_space:
        raise ValueError("test_data is normalised differently from the synthetic set's source "
                         "(mean, std or ZCA differ): evaluate on the test split of the same load")


def _train_and_test(synthetic_set: SyntheticSet, model_name: str, test_data: Dataset, seeds: list[int],
                    cfg: TrainConfig | None, model_options: dict | None, progress: bool) -> list[float]:
    """The test accuracy of one network per seed trained on ``synthetic_set`` alone, as one stack."""
    cfg = evaluation_config() if cfg is None else cfg
    train_set = synthetic_set.as_dataset().to(test_data.device)
    options = dict(model_options or {})
    stack = Stack.from_seeds(
        lambda: models.create(model_name, synthetic_set.num_classes, test_data.image_shape, **options), seeds)
    result = fit(stack.to(test_data.device), train_set, cfg, seeds, eval_data=test_data, progress=progress,
                 description=f"evaluate {synthetic_set.method}")
    return [float(a) for a in result.metrics["test_accuracy"]]


__all__ = ["distill", "evaluate", "evaluation_config", "SyntheticSet", "MultiFormationSet", "random_real", "DSA",
           "DSARanges", "STRATEGY", "DMConfig", "DSAConfig", "IDCConfig", "MTTConfig", "DistributionMatching",
           "GradientMatching", "IDC", "TrajectoryMatching", "ExpertBuffer", "METHODS"]
