"""Magnitude pruning and the lottery-ticket loop (IMP with rewinding), with distilled, subset and
easy (EL2N) data in the inner loop, and a random-pruning baseline.

The open_lth conventions: each round prunes ``rate`` of the weights still alive (default 20%),
by |w|, with one global threshold (or per layer); only prunable weights (conv and linear, never
biases or norm parameters); a pruned weight never comes back; the survivors rewind to the
weights at ``rewind_step`` (0 = initialisation). After r rounds the density is exactly
(1 - rate)^r, rounded once per tensor (layer-wise) or once overall (global).

Example::

    splits = fastmask.data.load("digits")
    model = fastmask.models.create("convnet3", 10, splits.train.image_shape)
    result = imp(model, splits, rounds=5, inner="distilled", distilled=syn_set,
                 inner_cfg=TrainConfig(steps=300, batch_size=100), retrain_cfg=TrainConfig(epochs=15))
    for r in result.rounds:
        print(r["density"], r["test_accuracy"], r["train_points_used"])
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask import distributed, io
from fastmask.data import Dataset, DataSplits
from fastmask.models import prunable_parameters
from fastmask.nn import is_masked, sparsify
from fastmask.stack import Stack
from fastmask.train import TrainConfig, fit

INNER_DATA = ("real", "distilled", "subset", "easy")


def current_masks(model: nn.Module) -> dict[str, Tensor]:
    """The mask of every prunable weight: its module's ``mask`` buffer, or all-true."""
    modules = dict(model.named_modules())
    masks = {}
    for name, weight in prunable_parameters(model).items():
        owner = modules[name.rpartition(".")[0]]
        masks[name] = owner.mask.clone() if is_masked(owner) else torch.ones_like(weight, dtype=torch.bool)
    return masks


def _check_masks(masks: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"masks name tensors that are not prunable weights of the model: {unknown}")
    checked = dict((name, torch.ones_like(p, dtype=torch.bool)) for name, p in params.items())
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"masks[{name!r}] must be boolean, got {mask.dtype}")
        checked[name] = mask.to(params[name].device)
    return checked


def _keep_largest(scores: Tensor, alive: Tensor, keep: int) -> Tensor:
    """Boolean mask keeping the ``keep`` alive entries of largest score; ties go to the lower index."""
    flat_alive = alive.flatten()
    alive_index = torch.nonzero(flat_alive).flatten()
    order = torch.argsort(scores.flatten()[alive_index], descending=True, stable=True)
    kept = torch.zeros_like(flat_alive)
    kept[alive_index[order[:keep]]] = True
    return kept.view(alive.shape)


def _unflatten(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split one flat mask over all prunable tensors back into per-tensor masks."""
    chunks = flat.split([p.numel() for p in params.values()])
    return {name: chunk.view(p.shape) for (name, p), chunk in zip(params.items(), chunks)}


def magnitude_masks(model: nn.Module, rate: float = 0.2, scope: str = "global",
                    masks: dict[str, Tensor] | None = None, *, density: float | None = None) -> dict[str, Tensor]:
    """Prune ``rate`` of the prunable weights still alive, smallest |w| first.

    Args:
        model: any nn.Module (its conv and linear weights) or a fastmask model (its ``prunable``).
        rate: the fraction of alive weights to remove, in [0, 1).
        scope: ``"global"`` (one threshold over all prunable weights) or ``"layer"`` (per tensor).
        masks: the current masks by parameter name; by default the model's own (all-true if none).
        density: instead of ``rate``, the density to reach, as a fraction of each scope's full size
            (IMP uses (1 - rate)^r so that rounding never accumulates over rounds).

    Returns ``{parameter name: boolean mask}``; a pruned weight never comes back.
    """
    if density is None and not (isinstance(rate, (int, float)) and 0 <= rate < 1):
        raise ValueError(f"rate must lie in [0, 1), got {rate!r}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    params = prunable_parameters(model)
    alive = _check_masks(current_masks(model) if masks is None else masks, params)

    def target(alive_count: int, size: int) -> int:
        keep = alive_count - round(rate * alive_count) if density is None else round(density * size)
        if keep > alive_count:
            raise ValueError(f"density {density} would revive pruned weights ({alive_count} of {size} alive)")
        return keep

    with torch.no_grad():
        if scope == "layer":
            return {name: _keep_largest(p.abs(), alive[name], target(int(alive[name].sum()), p.numel()))
                    for name, p in params.items()}
        scores = torch.cat([p.detach().abs().flatten().float() for p in params.values()])
        flat_alive = torch.cat([alive[name].flatten() for name in params])
        kept = _keep_largest(scores, flat_alive, target(int(flat_alive.sum()), flat_alive.numel()))
        return _unflatten(kept, params)


def random_masks(model: nn.Module, density: float, scope: str = "layer", seed: int = 0) -> dict[str, Tensor]:
    """Random masks at ``density``: the random-pruning baseline. ``"layer"`` keeps that fraction of
    every tensor; ``"global"`` draws the kept weights uniformly over all prunable weights."""
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    params = prunable_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    everything = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in params.items()}
    if scope == "layer":
        masks = {name: _keep_largest(scores[name], everything[name], round(density * p.numel()))
                 for name, p in params.items()}
    elif scope == "global":
        total = sum(p.numel() for p in params.values())
        flat = _keep_largest(torch.cat([s.flatten() for s in scores.values()]), torch.ones(total, dtype=torch.bool),
                             round(density * total))
        masks = _unflatten(flat, params)
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return {name: m.to(params[name].device) for name, m in masks.items()}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Set the masks on ``model`` (masked modules; plain Conv2d/Linear are sparsified first)."""
    if any(not is_masked(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        sparsify(model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name.rpartition(".")[0]].set_mask(mask)
    return model


def density(masks: dict[str, Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def el2n_scores(model: nn.Module, data: Dataset, cfg: TrainConfig, num_models: int = 4, seed: int = 0) -> Tensor:
    """EL2N scores (Paul et al., 2021): ||softmax(f(x)) - onehot(y)||_2 per training example, averaged
    over ``num_models`` copies of ``model`` trained briefly (``cfg``, early in training) as one stack."""
    copies = []
    for k in range(num_models):
        torch.manual_seed(seed + k)
        copy_k = copy.deepcopy(model)
        for module in copy_k.modules():  # fresh initialisations, as the paper averages over networks
            if hasattr(module, "reset_parameters") and module is not copy_k:
                module.reset_parameters()
        copies.append(copy_k)
    stack = Stack(copies)
    fit(stack, data, cfg, seed=[seed + k for k in range(num_models)], progress=False)
    stack.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(data), 1024):
            probs = stack(data.images[start:start + 1024], shared=True).float().softmax(-1)
            onehot = F.one_hot(data.labels[start:start + 1024], probs.shape[-1]).to(probs.dtype)
            scores.append((probs - onehot).norm(dim=-1).mean(0))
    return torch.cat(scores)


@dataclasses.dataclass
class IMPResult:
    """Per-round records ``{round, density, test_accuracy, train_points_used, inner}``, the masks
    (``masks[r]`` is the mask of round r; round 0 is dense) and the rewind weights."""

    rounds: list[dict]
    masks: list[dict[str, Tensor]]
    rewind_weights: dict[str, Tensor]


def _inner_schedule(inner, rounds: int) -> list[str]:
    schedule = [inner] * rounds if isinstance(inner, str) else list(inner)
    if len(schedule) != rounds:
        raise ValueError(f"inner must be one of {INNER_DATA} or a list of {rounds} of them (one per pruning round)")
    bad = sorted(set(schedule) - set(INNER_DATA))
    if bad:
        raise ValueError(f"inner must be one of {INNER_DATA}, got {bad}")
    return schedule


def imp(model: nn.Module, data: DataSplits, rounds: int, rate: float = 0.2, rewind_step: int = 0,
        inner: str | Sequence[str] = "real", *, distilled=None, subset_fraction: float = 0.1,
        easy_fraction: float = 0.1, scope: str = "global", inner_cfg: TrainConfig | None = None,
        retrain_cfg: TrainConfig | None = None, seed: int = 0, retrain_stack: int = 4,
        out_dir: str | Path | None = None, progress: bool = True) -> IMPResult:
    """Iterative magnitude pruning with rewinding: the lottery-ticket loop.

    Round 0 is the dense network. Round r trains the current subnetwork from the rewind weights on
    the inner data (``inner``: ``"real"``, ``"distilled"`` (``distilled``: a SyntheticSet or
    Dataset), ``"subset"`` (a random ``subset_fraction`` of the real training set) or ``"easy"``
    (the ``easy_fraction`` lowest-EL2N examples); or a list with one entry per pruning round, e.g.
    distilled then real: a hybrid schedule), prunes ``rate`` of the remaining weights
    (``scope``), and rewinds the survivors to the weights at ``rewind_step``.

    Every round's mask is then retrained on the real data from the rewind weights
    (``retrain_cfg``; ``retrain_stack`` masks at a time as one stack) and tested. The rewind point
    is reached by training on the real data (on the subset / easy data for those inner choices:
    the Data Diet setting). ``train_points_used`` counts the examples the inner loop (and the
    rewind pretraining) consumed to find each mask. With ``out_dir`` every finished round and
    retraining is saved, and a rerun resumes where the last one stopped.

    Under torchrun (``fastmask.distributed``) call it on every rank: the rounds train data
    parallel, the retraining of the other masks is dealt out over the ranks, and rank 0 writes.
    """
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    if not 0 < rate < 1:
        raise ValueError(f"rate must lie in (0, 1), got {rate!r}")
    schedule = _inner_schedule(inner, rounds)
    if "distilled" in schedule and distilled is None:
        raise ValueError("inner='distilled' needs distilled= (a SyntheticSet or Dataset)")
    retrain_cfg = retrain_cfg or TrainConfig()
    inner_cfg = inner_cfg or retrain_cfg
    device = next(model.parameters()).device
    out = Path(out_dir) if out_dir is not None else None
    state_file = out / "imp_state.json" if out else None
    # Rank 0's view of the folder decides where every rank resumes (see fastmask.distributed).
    state = distributed.main_only(lambda: json.loads(state_file.read_text()) if state_file and state_file.exists()
                                  else {"found": 0, "points": [0]})

    model = sparsify(copy.deepcopy(model))
    inner_data = {"real": data.train}
    if distilled is not None:
        inner_data["distilled"] = (distilled.as_dataset() if hasattr(distilled, "as_dataset") else distilled).to(device)
    if "subset" in schedule:
        generator = torch.Generator().manual_seed(seed)
        count = max(1, round(subset_fraction * len(data.train)))
        inner_data["subset"] = data.train.subset(torch.randperm(len(data.train), generator=generator)[:count].to(device))
    if "easy" in schedule:
        scores = el2n_scores(model, data.train, dataclasses.replace(retrain_cfg, epochs=min(retrain_cfg.epochs, 2.0),
                                                                    steps=None), seed=seed)
        count = max(1, round(easy_fraction * len(data.train)))
        inner_data["easy"] = data.train.subset(torch.argsort(scores, stable=True)[:count])
    pretrain_data = inner_data[schedule[0]] if schedule and schedule[0] in ("subset", "easy") else data.train

    # The rewind weights: initialisation, or the weights after rewind_step steps of pretraining.
    rewind_file = out / "rewind.safetensors" if out else None
    if rewind_file and distributed.broadcast_object(rewind_file.exists()):
        rewind = io.load_tensors(rewind_file, device)
    else:
        rewind = {k: v.clone() for k, v in model.state_dict().items()}
        if rewind_step > 0:
            pretrained = copy.deepcopy(model)
            fit(pretrained, pretrain_data, dataclasses.replace(retrain_cfg, steps=rewind_step), seed=seed,
                progress=progress, description="rewind point")
            rewind = {k: v.clone() for k, v in pretrained.state_dict().items()}
        distributed.broadcast_tensors(rewind)  # rank 0's copy is the one saved: every rank uses it
        if rewind_file and distributed.is_writer():
            io.save_tensors(rewind_file, rewind)
    pretrain_points = rewind_step * min(retrain_cfg.batch_size, len(pretrain_data))
    if state["points"] == [0]:
        state["points"] = [pretrain_points]

    masks = [current_masks(model)] + [io.load_tensors(out / f"mask_round{r}.safetensors", device)
                                      for r in range(1, state["found"] + 1)]
    retrain_folder = out / "retrain" if out else None
    retrained = {}  # mask index -> test accuracy, for the masks the real inner loop retrains
    # Find the masks, one pruning round at a time.
    for r in range(state["found"], rounds):
        subnetwork = apply_masks(_rewound(model, rewind), masks[r])
        real = schedule[r] == "real"
        result = fit(subnetwork, inner_data[schedule[r]], retrain_cfg if real else inner_cfg, seed=seed,
                     eval_data=data.test if real else None, progress=progress,
                     description=f"IMP round {r} ({schedule[r]})")
        if real:  # this training is the retraining of mask r: keep its accuracy
            retrained[r] = result.metrics["test_accuracy"]
            if retrain_folder and distributed.is_writer():
                distributed.save_unit(retrain_folder, r, retrained[r])
        masks.append(magnitude_masks(subnetwork, scope=scope, masks=masks[r], density=(1 - rate) ** (r + 1)))
        distributed.broadcast_tensors(masks[-1])  # rank 0's mask is the one saved: every rank uses it
        state["points"].append(state["points"][-1] + result.examples_seen)
        state["found"] = r + 1
        if out and distributed.is_writer():
            io.save_tensors(out / f"mask_round{r + 1}.safetensors", masks[-1])
            io.write_json(state_file, state)

    accuracies = _retrain(model, rewind, masks, data, retrain_cfg, seed, retrain_stack, retrain_folder, retrained,
                          progress)
    records = [{"round": r, "density": density(m), "test_accuracy": accuracies[r],
                "train_points_used": state["points"][r], "inner": schedule[r - 1] if r else "dense"}
               for r, m in enumerate(masks)]
    return IMPResult(records, masks, rewind)


def _rewound(model: nn.Module, rewind: dict[str, Tensor]) -> nn.Module:
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(rewind)
    return copy_


def retrain_masks(model: nn.Module, rewind: dict[str, Tensor], masks: list[dict[str, Tensor]], data: DataSplits,
                  cfg: TrainConfig, seed: int = 0, chunk: int = 4, out_dir: str | Path | None = None,
                  progress: bool = True) -> list[float]:
    """Test accuracy of each mask retrained on the real data from ``rewind``, ``chunk`` masks at a
    time as one stack (one kernel launch per layer for all of them). Under torchrun the masks are
    units of work dealt out over the ranks (``fastmask.distributed.map_unit_groups``). With
    ``out_dir`` each accuracy is kept in ``out_dir/retrain/<index>.json`` as it is found, and a
    rerun skips those masks."""
    folder = Path(out_dir) / "retrain" if out_dir is not None else None
    return _retrain(model, rewind, masks, data, cfg, seed, chunk, folder, {}, progress)


def _retrain(model, rewind, masks, data, cfg, seed, chunk, folder: Path | None, known: dict[int, float],
             progress) -> list[float]:
    def train(group: list[int]) -> list[float]:
        stack = Stack([apply_masks(_rewound(model, rewind), masks[r]) for r in group]).to(data.train.device)
        result = fit(stack, data.train, cfg, seed=[seed] * len(group), eval_data=data.test, progress=progress,
                     description=f"retrain masks {group}")
        return result.metrics["test_accuracy"]

    accuracies = distributed.map_unit_groups(range(len(masks)), train, folder, group=max(1, chunk), known=known)
    return [accuracies[r] for r in range(len(masks))]
