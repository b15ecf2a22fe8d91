"""fastmask's study (``fastmask.study``, ``fastmask.stages.study``) the plain way: every density of
every arm retrained over seeds, one network at a time.

    measure               2 * seeds copies of one subnetwork (``torch.nn.utils.prune`` masks) trained
                          one after another from the rewind weights, copies (2s, 2s + 1) seed s's pair:
                          per seed the mean test accuracy of its pair, the pair's error and loss
                          barriers on the train and the test split (one alpha at a time), the
                          Hessian trace of its first copy (one Hutchinson probe at a time)
    per_example_barriers  each training example's loss barrier along a pair's segment, one
                          interpolated network (``load_state_dict``) and one DataLoader pass per alpha
    connectivity          the fraction of examples below a threshold, and their histogram
    run                   the study stage: the dense network (every arm's round 0, measured once),
                          every arm's masks, per-example LMC and seed 0's curves of the dense network
                          and each arm's last subnetwork, the planes of the arms the landscape stage
                          does not draw, the claims

The claims are judged by fastmask's own function (``fastmask.study.claims``): the judging is
fastmask's, every number it judges is the reference's.

Example::

    entry, pair = measure(template, rewind, masks, cfg, train_data, test_data, loaders, hessian_batches, device)
    entry["test_accuracy_mean"], entry["barrier_error_test_mean"], entry["hessian_trace"]
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask.study import claims

from bench.reference import hessian, landscape, lmc, prune
from bench.reference.data import eval_loader, to_device
from bench.reference.train import train

ARMS = ("real", "distilled", "hybrid", "random")  # fastmask's arms but subset and easy (Data Diet's rewind points)
NOT_WRITTEN = ("subset", "easy")
DRAWN = ("dense", "real", "distilled")  # the networks the landscape stage draws


def check_arms(arms) -> None:
    """Refuse the arms the reference does not write (subset, easy), before any work."""
    unwritten = [arm for arm in arms if arm in NOT_WRITTEN]
    if unwritten:
        raise ValueError(f"study.arms: {unwritten} (Data Diet's pre-trained rewind points) are not written in the "
                         f"eager reference pipeline; its study runs the arms {list(ARMS)}")


def copy_seeds(seed: int, seeds: int) -> list[int]:
    """The data-order seeds of the ``2 * seeds`` copies (as ``fastmask.study.copy_seeds``)."""
    return [seed + 1 + i for i in range(2 * seeds)]


def first(data: tuple[Tensor, Tensor], count: int | None) -> tuple[Tensor, Tensor]:
    """The first ``count`` examples of ``(images, labels)`` (all of them for None)."""
    return data if count is None else (data[0][:count], data[1][:count])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measure(template: nn.Module, rewind: dict[str, Tensor], masks: dict[str, Tensor] | None, cfg,
            train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor], loaders: dict,
            hessian_batches: list, device: torch.device, **options) -> tuple[dict, tuple[nn.Module, nn.Module]]:
    """One subnetwork over ``cfg.study.seeds`` pairs of copies, trained one after another on
    ``train_data`` (``cfg.train``) and tested on ``test_data`` (the study's test split);
    ``loaders``: ``"train"`` and ``"test"``, the splits of the barriers. ``options``: ``train``'s
    ``num_workers`` and ``compile``. Returns the entry (``fastmask.study.measure``'s keys) and seed
    0's pair."""
    seeds = cfg.study.seeds
    copies, accuracies = [], []
    for seed in copy_seeds(cfg.seed, seeds):
        net = prune.subnetwork(template, rewind, masks)
        accuracies.append(train(net, *train_data, cfg.train, seed, test=test_data, device=device,
                                **options).test_accuracy)
        copies.append(net)
    alphas = lmc.alpha_grid(cfg.lmc.alphas)
    per_seed = {"accuracy": [], "error_test": [], "loss_test": [], "error_train": [], "loss_train": []}
    curves = {}  # seed 0's interpolation curves
    for s in range(seeds):
        a, b = copies[2 * s], copies[2 * s + 1]
        per_seed["accuracy"].append((accuracies[2 * s] + accuracies[2 * s + 1]) / 2)
        for split in ("test", "train"):
            losses, errors = lmc.curve(a, b, alphas, loaders[split], device)
            per_seed[f"error_{split}"].append(lmc.barrier(alphas, errors))
            per_seed[f"loss_{split}"].append(lmc.barrier(alphas, losses))
            if s == 0:
                curves.update({"alphas": alphas, f"{split}_error": errors, f"{split}_loss": losses})
    entry = {"density": prune.density(masks) if masks else 1.0, "curve_seed0": curves}
    entry["test_accuracy_mean"], entry["test_accuracy_std"] = _mean_std(per_seed["accuracy"])
    entry["test_accuracies"] = per_seed["accuracy"]
    for quantity in ("error", "loss"):
        for split in ("test", "train"):
            key = f"barrier_{quantity}_{split}"
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(per_seed[f"{quantity}_{split}"])
    # each seed's first copy, with its own probes (seed s's probes are the same in every arm)
    estimates = [hessian.hutchinson(copies[2 * s], hessian_batches, cfg.hessian.num_probes, cfg.seed + s, device)
                 for s in range(seeds)]
    entry["hessian_traces"] = [e["trace"] for e in estimates]
    entry["hessian_trace"], entry["hessian_trace_std"] = _mean_std(entry["hessian_traces"])
    entry["hessian_trace_stderr"] = math.sqrt(sum(e["trace_stderr"] ** 2 for e in estimates)) / seeds
    return entry, (copies[0], copies[1])


@torch.no_grad()
def per_example_barriers(model_a: nn.Module, model_b: nn.Module, alphas: list[float], loader,
                         device: torch.device) -> Tensor:
    """Each example's loss barrier on the segment from ``model_a`` to ``model_b``: max over ``alphas``
    of its cross-entropy (float64) minus the mean of its two endpoint losses. ``[N]`` float64, CPU."""
    net = prune.copy_model(model_a).eval()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    losses = []  # [alpha][example]
    for alpha in alphas:
        net.load_state_dict(lmc.interpolated_state(state_a, state_b, alpha))
        per_batch = []
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, targets, device)
            per_batch.append(F.cross_entropy(net(inputs).double(), targets, reduction="none").cpu())
        losses.append(torch.cat(per_batch))
    losses = torch.stack(losses)
    ends = (losses[alphas.index(0.0)] + losses[alphas.index(1.0)]) / 2
    return losses.max(0).values - ends


def connectivity(barriers: Tensor, threshold: float, bins: int) -> dict:
    """``{"fraction", "threshold", "histogram": {"edges", "counts"}, "mean_barrier"}``: the fraction of
    examples whose barrier lies below ``threshold``, and ``bins`` equal bins from min(0, lowest
    barrier) to max(highest barrier, threshold) (``fastmask.study.connectivity``'s definition)."""
    values = barriers.numpy().astype(np.float64)
    low, high = min(0.0, float(values.min())), max(float(values.max()), threshold)
    counts, edges = np.histogram(values, bins=bins, range=(low, high if high > low else low + 1))
    return {"fraction": float((values < threshold).mean()), "threshold": threshold,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}, "mean_barrier": float(values.mean())}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(cfg, arms: dict[str, tuple[dict, list, list[int]]], dense_rewind: dict[str, Tensor], template: nn.Module,
        train_data: tuple[Tensor, Tensor], test_data: tuple[Tensor, Tensor], hessian_batches: list,
        device: torch.device, say=print, batch_size: int = 1024, **options) -> dict:
    """The study stage's result (``fastmask.stages.study.run``'s schema) from ``arms``: per arm
    (rewind weights, masks per round, training points per round). ``dense_rewind``: the real arm's
    rewind weights, the dense network's; an arm's round 0 with them is that network, measured once.
    ``template``: the unpruned model the subnetworks are copied from; ``say``: progress messages;
    ``batch_size``: of the evaluations; ``options``: ``train``'s ``num_workers`` and ``compile``."""
    pin = device.type == "cuda"
    test = first(test_data, cfg.study.test_examples)
    loaders = {"train": eval_loader(*first(train_data, cfg.study.train_examples), batch_size, pin_memory=pin),
               "test": eval_loader(*test, batch_size, pin_memory=pin)}
    alphas = lmc.alpha_grid(cfg.lmc.alphas)
    units = {"dense": (None, dense_rewind, True)}  # unit -> (masks, rewind, per-example LMC too)
    names = {}  # (arm, round) -> unit
    for arm, (rewind, masks, _) in arms.items():
        for r, mask in enumerate(masks):
            if r == 0 and _same(rewind, dense_rewind):
                names[arm, r] = "dense"
                continue
            names[arm, r] = f"{arm}_{r}"
            units[names[arm, r]] = (mask, rewind, r == len(masks) - 1)
    planes = {names[arm, len(masks) - 1]: arm for arm, (_, masks, _) in arms.items()
              if arm not in DRAWN} if cfg.landscape.enabled else {}
    measured = {}
    for unit, (masks, rewind, per_example) in units.items():
        say(f"study ({unit})")
        entry, pair = measure(template, rewind, masks, cfg, train_data, test, loaders, hessian_batches, device,
                              **options)
        if per_example:
            barriers = per_example_barriers(*pair, alphas, loaders["train"], device)
            entry["per_example_lmc"] = connectivity(barriers, cfg.study.lmc_threshold, cfg.study.histogram_bins)
        if unit in planes:  # w0: the masked rewind weights; w1, w2: seed 0's pair
            start = prune.subnetwork(template, rewind, masks)
            entry["landscape"] = landscape.plane(start, *pair, loaders["test"], cfg.landscape.grid, device)
        measured[unit] = entry
    out_arms, per_example = {}, {"dense": measured["dense"]["per_example_lmc"]}
    curves = {"dense": measured["dense"]["curve_seed0"]}
    landscapes = {arm: measured[unit]["landscape"] for unit, arm in planes.items()}
    for arm, (_, masks, points) in arms.items():
        entries = []
        for r in range(len(masks)):
            entry = {key: value for key, value in measured[names[arm, r]].items()
                     if key not in ("per_example_lmc", "curve_seed0", "landscape")}
            entries.append({"round": r, **entry, "train_points_used": points[r]})
        out_arms[arm] = entries
        last = measured[names[arm, len(masks) - 1]]
        per_example[arm], curves[arm] = last["per_example_lmc"], last["curve_seed0"]
    return {"seeds": cfg.study.seeds, "stacked": False, "arms": out_arms, "per_example_lmc": per_example,
            "curves": curves, "landscapes": landscapes, "claims": claims(out_arms, per_example, cfg.study.seeds)}
