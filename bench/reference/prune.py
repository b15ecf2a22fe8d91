"""Lottery-ticket IMP the way the authors' code does it: ``torch.nn.utils.prune`` masks
(``global_unstructured`` with L1 magnitude, or ``l1_unstructured`` per layer), a fresh copy of
the network per round rewound with ``load_state_dict``, one training run after another.

Masks are ``{"<module>.weight": bool tensor}`` over every Conv2d / Linear (the names of
fastmask's masks). Each round prunes down to ``round(density * size)`` surviving weights with
``density = (1 - rate)^(r + 1)`` (an absolute count passed to ``torch.nn.utils.prune``), so the
sparsity is exact and matches fastmask's.

Example::

    outcome = imp(template, rewind_state, data, rounds=5, rate=0.2, inner="real", ...)
    outcome.rounds[-1]["test_accuracy"]
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from bench.reference.models import prunable_modules
from bench.reference.train import train


def apply_masks(model: nn.Module, masks: dict[str, Tensor] | None) -> nn.Module:
    """Reparametrise the named weights with ``prune.custom_from_mask`` and zero their pruned entries."""
    if not masks:
        return model
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules[name.rpartition(".")[0]]
        prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
        with torch.no_grad():
            module.weight_orig.mul_(module.weight_mask)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a model that ``torch.nn.utils.prune`` reparametrised: the ``weight``
    attribute its hook left from a forward with gradient is not a leaf (deepcopy refuses it), so it
    is first recomputed without gradient, as the next forward would."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_mask"):
                module.weight = module.weight_orig * module.weight_mask
    return copy.deepcopy(model)


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """The mask of every prunable weight (all-true where the module is not pruned)."""
    return {f"{name}.weight": (m.weight_mask != 0) if hasattr(m, "weight_mask") else
            torch.ones_like(m.weight, dtype=torch.bool) for name, m in prunable_modules(model)}


def density(masks: dict[str, Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def prune_to_density(model: nn.Module, target: float, scope: str = "global") -> dict[str, Tensor]:
    """Prune the smallest-magnitude surviving weights until ``round(target * size)`` are left,
    over all prunable weights at once (``global``) or per tensor (``layer``); returns the masks."""
    # torch's pruning flattens weights and masks with view(-1), which the channels_last order of the
    # CUDA training loop refuses: prune in contiguous order, scoring the current weights (a pruned
    # module's `weight` attribute is only recomputed from weight_orig at the next forward).
    model.to(memory_format=torch.contiguous_format)
    modules = prunable_modules(model)
    scores = {m: (m.weight_orig * m.weight_mask if prune.is_pruned(m) else m.weight).detach().contiguous()
              for _, m in modules}
    alive = {name: int(mask.sum()) for name, mask in get_masks(model).items()}
    if scope == "global":
        size = sum(m.weight.numel() for _, m in modules)
        prune.global_unstructured([(m, "weight") for _, m in modules], pruning_method=prune.L1Unstructured,
                                  amount=sum(alive.values()) - round(target * size),
                                  importance_scores={(m, "weight"): scores[m] for _, m in modules})
    elif scope == "layer":
        for name, m in modules:
            prune.l1_unstructured(m, "weight", amount=alive[f"{name}.weight"] - round(target * m.weight.numel()),
                                  importance_scores=scores[m])
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return get_masks(model)


def random_masks(model: nn.Module, target: float, seed: int) -> dict[str, Tensor]:
    """Layer-wise random masks keeping ``round(target * size)`` weights of every tensor (the
    random-pruning baseline), drawn with ``prune.random_unstructured`` on a copy of ``model``."""
    scratch = copy.deepcopy(model)
    torch.manual_seed(seed)
    for _, m in prunable_modules(scratch):
        prune.random_unstructured(m, "weight", amount=m.weight.numel() - round(target * m.weight.numel()))
    return get_masks(scratch)


@dataclasses.dataclass
class IMPOutcome:
    rounds: list[dict]  # {round, density, test_accuracy (None: not retrained), train_points_used, inner}
    masks: list[dict[str, Tensor]]
    rewind: dict[str, Tensor]


def subnetwork(template: nn.Module, rewind: dict[str, Tensor], masks: dict[str, Tensor] | None) -> nn.Module:
    """A copy of the unpruned ``template`` holding the ``rewind`` weights, pruned by ``masks``."""
    net = copy.deepcopy(template)
    net.load_state_dict(rewind)
    return apply_masks(net, masks)


def imp(template: nn.Module, data: dict[str, tuple[Tensor, Tensor]], rounds: int, rate: float, rewind_step: int,
        inner: str | list[str], *, scope: str, inner_cfg, retrain_cfg, seed: int, device: torch.device,
        num_workers: int = 0, compile: bool = False, retrain: bool = True) -> IMPOutcome:
    """IMP with rewinding, every round's mask retrained on the real data and tested.

    ``data`` holds CPU ``(images, labels)`` pairs under ``"train"``, ``"test"`` and, for a
    distilled inner loop, ``"distilled"``. Round r trains the subnetwork of mask r from the
    rewind weights on the inner data (``retrain_cfg`` on real data, where that training is also
    mask r's retraining; ``inner_cfg`` on the distilled set), prunes it, and the next round
    starts again from the rewind weights. ``inner`` is ``"real"`` or ``"distilled"`` for every
    round, or a list with one of them per round (a hybrid: distilled rounds, then real ones).
    Without ``retrain`` the masks no real round trained are not retrained: their accuracy is None.
    """
    schedule = [inner] * rounds if isinstance(inner, str) else list(inner)
    if len(schedule) != rounds or not set(schedule) <= {"real", "distilled"}:
        raise ValueError(f"inner must be 'real' or 'distilled', or a list of {rounds} of them, got {inner!r}")
    options = dict(device=device, num_workers=num_workers, compile=compile)
    rewind = {k: v.clone() for k, v in template.state_dict().items()}
    if rewind_step > 0:
        pretrained = copy.deepcopy(template)
        train(pretrained, *data["train"], dataclasses.replace(retrain_cfg, steps=rewind_step), seed, **options)
        rewind = {k: v.clone() for k, v in pretrained.state_dict().items()}
    points = [rewind_step * min(retrain_cfg.batch_size, len(data["train"][0]))]
    masks: list[dict[str, Tensor] | None] = [None]
    accuracy: dict[int, float | None] = {}
    for r in range(rounds):
        net = subnetwork(template, rewind, masks[r])
        if schedule[r] == "real":
            outcome = train(net, *data["train"], retrain_cfg, seed, test=data["test"], **options)
            accuracy[r] = outcome.test_accuracy
        else:
            outcome = train(net, *data["distilled"], inner_cfg, seed, **options)
        masks.append(prune_to_density(net, (1 - rate) ** (r + 1), scope))
        points.append(points[-1] + outcome.examples_seen)
    for r, mask in enumerate(masks):
        if r not in accuracy:
            net = subnetwork(template, rewind, mask)
            accuracy[r] = (train(net, *data["train"], retrain_cfg, seed, test=data["test"], **options).test_accuracy
                           if retrain else None)
    dense = get_masks(template)
    full = [dense if m is None else m for m in masks]
    records = [{"round": r, "density": density(m), "test_accuracy": accuracy[r], "train_points_used": points[r],
                "inner": schedule[r - 1] if r else "dense"} for r, m in enumerate(full)]
    return IMPOutcome(records, full, rewind)
