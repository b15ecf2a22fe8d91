"""Masks: the one mask type of fastmask, and its conversions to and from models.

A mask is a boolean tensor of its weight's shape, True where the weight is kept. Every place
that takes a mask (the ops, the masked modules, the optimizers, pruning, the Hessian, LMC and
landscapes) accepts a boolean or 0/1 tensor and validates it with ``check``; the rest of
fastmask holds masks as booleans. A model's masks come in two keyings:

- by weight name (``"features.0.weight"``), the keying of pruning, IMP and the run folder's mask
  files: ``of(model)`` reads them, ``apply(model, masks)`` sets them, ``density`` measures them;
- by parameter, the keying of the optimizers and the Hessian: ``by_parameter(model)`` finds every
  parameter a mask belongs to, in fastmask's convention (a ``weight`` parameter beside a ``mask``
  buffer: ``fastmask.nn``'s masked modules, the stacked layers of ``fastmask.stack``) and in
  ``torch.nn.utils.prune``'s (``<name>_orig`` beside ``<name>_mask``).

Modules go to and from ``torch.nn.utils.prune`` with ``fastmask.nn.sparsify`` (which keeps a
pruned module's mask) and ``fastmask.nn.to_torch_prune``.

Example::

    from fastmask import masks
    keep = masks.check(torch.rand(16, 3, 3, 3) > 0.5, (16, 3, 3, 3))
    current = masks.of(model)                         # {"features.0.weight": mask, ...}
    masks.apply(model, {"head.weight": model.head.weight.abs() > 0.01})
    print(masks.density(model))
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["check", "density", "of", "apply", "by_parameter"]


def check(mask, shape: Sequence[int], name: str = "mask", *, owner: str = "the weight", stacked: bool = False,
          device: torch.device | None = None) -> Tensor:
    """``mask`` validated against its weight and returned as a boolean tensor.

    A mask is a tensor, boolean or holding only 0 and 1, of the weight's ``shape`` (with
    ``stacked``, its leading model dimension may be 1: one mask shared by the K models of a
    stack) and, when ``device`` is given, on that device. Errors name the mask ``name`` and its
    weight ``owner``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    got, expected = tuple(mask.shape), tuple(shape)
    if not (got == expected or (stacked and len(got) == len(expected) and got[0] == 1 and got[1:] == expected[1:])):
        raise ValueError(f"{name} has shape {got} but {owner} has shape {expected}")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but {owner} is on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be boolean or hold only 0 and 1 (dtype {mask.dtype})")
    return mask != 0


def density(masks: Mapping[str, Tensor] | nn.Module) -> float:
    """The fraction of weights kept: over the masks of a mapping, or over a model's prunable
    weights (``of(model)``). 1.0 when there are no masks."""
    values = list((of(masks) if isinstance(masks, nn.Module) else masks).values())
    if not values:
        return 1.0
    return sum(int(m.sum()) for m in values) / sum(m.numel() for m in values)


def of(model: nn.Module) -> dict[str, Tensor]:
    """``{weight name: mask}`` for every prunable weight of ``model`` (``fastmask.models.prunable_parameters``:
    its ``prunable`` names, else every Conv2d / Linear weight): a copy of its masked module's mask,
    or all-true for a weight without one."""
    from fastmask.models import prunable_parameters  # models and nn sit above this module
    from fastmask.nn import is_masked

    modules = dict(model.named_modules())
    found = {}
    for name, weight in prunable_parameters(model).items():
        owner = modules[name.rpartition(".")[0]]
        found[name] = owner.mask.clone() if is_masked(owner) else torch.ones_like(weight, dtype=torch.bool)
    return found


def apply(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Set ``masks`` (``{"<module>.weight": mask}``, as ``of`` gives them) on ``model``, in place,
    zeroing the pruned weights; plain Conv2d / Linear layers are made masked first
    (``fastmask.nn.sparsify``). A name that is not a masked module's weight is a ValueError.
    Returns ``model``."""
    from fastmask.nn import is_masked, sparsify

    if any(not is_masked(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        sparsify(model)
    modules = {f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if is_masked(m)}
    unknown = sorted(set(masks) - set(modules))
    if unknown:
        raise ValueError(f"masks name weights that are not masked modules of the model: {unknown}")
    for name, mask in masks.items():
        modules[name].set_mask(mask)
    return model


def by_parameter(model: nn.Module) -> dict[nn.Parameter, Tensor]:
    """``{parameter: boolean mask}`` for every parameter of ``model`` that has a mask: a ``weight``
    beside a ``mask`` buffer of its module (fastmask's masked modules, stacked layers and anything
    shaped like them), or ``torch.nn.utils.prune``'s ``<name>_orig`` beside ``<name>_mask``.

    A mask that broadcasts to its weight (one mask ``[1, ...]`` shared by a stack of K models) is
    expanded to the weight's shape; the masks are the modules' own tensors (validated, not copied).
    """
    found: dict[nn.Parameter, Tensor] = {}
    for module_name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        for leaf, weight in module.named_parameters(recurse=False):
            if leaf == "weight":
                mask = buffers.get("mask")
            elif leaf.endswith("_orig"):
                mask = buffers.get(leaf[: -len("_orig")] + "_mask")
            else:
                continue
            if mask is None:
                continue
            where = f"module {module_name or type(model).__name__!r}"
            if mask.shape != weight.shape:
                try:
                    mask = mask.expand(weight.shape)
                except RuntimeError:
                    raise ValueError(f"{where}: mask buffer of shape {tuple(mask.shape)} does not fit its weight of "
                                     f"shape {tuple(weight.shape)}") from None
            mask = check(mask, weight.shape, f"{where}: the mask of {leaf!r}")
            if weight in found and not torch.equal(found[weight], mask):
                raise ValueError(f"{where} shares its weight with another module but has a different mask")
            found[weight] = mask
    return found
