"""The papers' experiments over seeds: one subnetwork (mask + rewind weights) measured as the study
stage measures every density of every arm, per-example linear mode connectivity, and the claims of
the four papers judged from the numbers.

``measure(model, masks, rewind, splits, cfg, seeds)``: ``2 * seeds`` copies of the subnetwork
trained from the rewind weights on the real data with different data orders, as one stack (or
several, or stacks of one: ``stack_size``), so that copies ``(2s, 2s + 1)`` are seed s's pair.
Each copy's test accuracy is a retrained network's accuracy; each pair is interpolated on the
train and the test data (``fastmask.lmc.interpolate``: error and loss barriers); the Hessian trace
(``fastmask.hessian``) of each seed's first copy gives the trace's mean and std over seeds, beside
the probes' standard error of that mean. No network is trained twice.

``per_example_barriers(model_a, model_b, alphas, data)``: each example's loss barrier along the
segment between two networks (max over alpha of its loss minus the mean of its endpoint losses),
the Data Diet paper's per-example linear mode connectivity; ``connectivity`` summarises it.

``claims(arms, per_example)``: each claim of the papers with the numbers of this run that bear on
it and a verdict, ``supported``, ``not supported`` or ``inconclusive`` (the difference is within
one standard deviation, or the run lacks what would decide it).

Example::

    from fastmask import study
    entry, pair = study.measure(model, masks, rewind, splits, TrainConfig(epochs=5), seeds=3,
                                alphas=11, hessian_batches=[(x, y)], hessian_probes=16)
    entry["test_accuracy_mean"], entry["barrier_error_test_mean"], entry["hessian_trace"]
    barriers = study.per_example_barriers(*pair, 11, splits.train)
"""
from __future__ import annotations

import copy
import math
import statistics
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask import evaluation, hessian, lmc, masks as masks_module
from fastmask.combinations import Combinations, aligned_sources
from fastmask.data import Dataset, DataSplits
from fastmask.stack import Stack
from fastmask.train import TrainConfig, evaluate, fit, training_footprint

ARMS = ("real", "distilled", "hybrid", "subset", "easy", "random")
NEEDS_DISTILLED = ("distilled", "hybrid")  # arms whose IMP trains on the distilled set
VERDICTS = ("supported", "not supported", "inconclusive")
MEMORY_FRACTION = 0.6  # of the free CUDA memory a stack of copies may take: the rest is headroom for the evaluations

__all__ = ["ARMS", "NEEDS_DISTILLED", "VERDICTS", "MEMORY_FRACTION", "copy_seeds", "first_examples", "copies_per_stack",
           "train_copies", "measure", "per_example_barriers", "connectivity", "claims"]


def copy_seeds(seed: int, seeds: int) -> list[int]:
    """The data-order seeds of the ``2 * seeds`` copies: seed s's pair is ``(2s, 2s + 1)`` after ``seed``."""
    return [seed + 1 + i for i in range(2 * seeds)]


def copies_per_stack(model: nn.Module, data: Dataset, cfg: TrainConfig, count: int) -> int:
    """How many of ``count`` copies of ``model`` train as one stack: all of them, or on CUDA as many
    as fit in ``MEMORY_FRACTION`` of the free memory (what the caching allocator holds unused counts
    as free), from one copy's measured training step (``train.training_footprint``)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return count  # the CPU's memory is not the limit
    per_copy = training_footprint(model, data, cfg)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(count, int(MEMORY_FRACTION * free // per_copy)))


def train_copies(model: nn.Module, masks: Optional[dict[str, Tensor]], rewind: dict[str, Tensor], data: Dataset,
                 cfg: TrainConfig, seeds: Sequence[int], stack_size: Optional[int] = None, progress: bool = False,
                 description: str = "copies") -> list[nn.Module]:
    """One copy of the subnetwork per data-order seed in ``seeds``, each trained from ``rewind``
    under ``masks`` on ``data``; ``stack_size`` copies at a time as one stack (None: as many as fit
    in memory, ``copies_per_stack``; 1: stacks of one, the loop a researcher would write). Returns
    the trained copies."""
    start = copy.deepcopy(model)
    start.load_state_dict(rewind)
    if masks is not None:
        masks_module.apply(start, masks)
    size = copies_per_stack(start, data, cfg, len(seeds)) if stack_size is None else stack_size
    # On CUDA a stack of copies trains as one stacked pass: what bench_study measured on an H200
    # (1.04-1.13x the speed of stacks of one); fit's own default there (one model at a time) was
    # measured on stacks of 2. The CPU keeps fit's default.
    one_at_a_time = False if next(start.parameters()).device.type == "cuda" else None
    trained = []
    for first in range(0, len(seeds), size):
        group = list(seeds[first:first + size])
        stack = Stack([start] * len(group))
        fit(stack, data, cfg, seed=group, progress=progress, description=f"{description} {group}",
            one_at_a_time=one_at_a_time)
        trained += stack.split()
    return trained


def first_examples(data: Dataset, count: Optional[int]) -> Dataset:
    """The first ``count`` examples of ``data`` (all of them for None)."""
    if count is None or count >= len(data):
        return data
    return data.subset(torch.arange(count, device=data.device))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def measure(model: nn.Module, masks: Optional[dict[str, Tensor]], rewind: dict[str, Tensor], splits: DataSplits,
            cfg: TrainConfig, seeds: int, *, seed: int = 0, alphas=lmc.DEFAULT_ALPHAS,
            train_examples: Optional[int] = None, test_examples: Optional[int] = None,
            hessian_batches: Sequence = (), hessian_probes: int = 16, stack_size: Optional[int] = None,
            progress: bool = False) -> tuple[dict, tuple[nn.Module, nn.Module]]:
    """One subnetwork measured over ``seeds`` pairs of copies (see the module docstring).

    ``train_examples``: the first that many training examples are the train split of the
    interpolations (None: all); ``test_examples``: the first that many test examples give the
    accuracies and the test interpolations (None: all). ``hessian_batches``: the ``(inputs, targets)`` batches of the
    Hessian's mean loss (empty: no Hessian). Returns the entry (``density``,
    ``test_accuracy_mean`` / ``_std`` and ``test_accuracies`` (one per seed: the mean of its
    pair), ``barrier_{error,loss}_{test,train}_mean`` / ``_std``, ``hessian_trace`` / ``_std``
    (mean and std over the seeds' first copies), ``hessian_traces`` (one per seed),
    ``hessian_trace_stderr`` (the probes' standard error of the mean), ``curve_seed0``: seed 0's
    ``{"alphas", "{test,train}_{error,loss}"}``) and seed 0's trained pair.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    copies = train_copies(model, masks, rewind, splits.train, cfg, copy_seeds(seed, seeds), stack_size, progress,
                          f"density {masks_module.density(masks or {}):.3f}")
    train, test = first_examples(splits.train, train_examples), first_examples(splits.test, test_examples)
    _, accuracies = evaluate(Stack(copies), test)
    per_seed = {"accuracy": [], "error_test": [], "loss_test": [], "error_train": [], "loss_train": []}
    curves = {}  # seed 0's interpolation curves
    for s in range(seeds):
        a, b = copies[2 * s], copies[2 * s + 1]
        per_seed["accuracy"].append((accuracies[2 * s] + accuracies[2 * s + 1]) / 2)
        for split, dataset in (("test", test), ("train", train)):
            curve = lmc.interpolate(a, b, alphas, dataset)
            per_seed[f"error_{split}"].append(curve.barrier_error)
            per_seed[f"loss_{split}"].append(curve.barrier_loss)
            if s == 0:
                curves.update({"alphas": curve.alphas, f"{split}_error": curve.error, f"{split}_loss": curve.loss})
    entry = {"density": masks_module.density(masks or {}), "curve_seed0": curves}
    entry["test_accuracy_mean"], entry["test_accuracy_std"] = _mean_std(per_seed["accuracy"])
    entry["test_accuracies"] = per_seed["accuracy"]
    for quantity in ("error", "loss"):
        for split in ("test", "train"):
            key = f"barrier_{quantity}_{split}"
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(per_seed[f"{quantity}_{split}"])
    entry["hessian_trace"] = entry["hessian_trace_std"] = entry["hessian_trace_stderr"] = None
    entry["hessian_traces"] = []
    if hessian_batches:  # each seed's first copy with its own probes (seed s's probes are the same in every arm)
        estimates = [hessian.hessian_diag(copies[2 * s], F.cross_entropy, hessian_batches, num_probes=hessian_probes,
                                          seed=seed + s) for s in range(seeds)]
        entry["hessian_traces"] = [e.trace for e in estimates]
        entry["hessian_trace"], entry["hessian_trace_std"] = _mean_std(entry["hessian_traces"])
        entry["hessian_trace_stderr"] = _spread(*(e.trace_stderr for e in estimates)) / seeds
    return entry, (copies[0], copies[1])


@torch.no_grad()
def per_example_barriers(model_a: nn.Module, model_b: nn.Module, alphas, data: Dataset,
                         batch_size: int = 256) -> Tensor:
    """Each example's loss barrier on the segment from ``model_a`` to ``model_b``: max over the
    alphas (``lmc.alpha_grid``) of its cross-entropy minus the mean of its two endpoint losses.
    The networks of all alphas run as one stack (``fastmask.combinations``). Returns ``[N]`` float64."""
    values = lmc.alpha_grid(alphas)
    coefficients = torch.tensor([[1.0 - a, a] for a in values], dtype=torch.float64)
    combinations = Combinations(Stack(aligned_sources([model_a, model_b])).eval(), in_kernel=False)
    forward = combinations.networks(coefficients)
    combinations.stack.eval()
    device = next(model_a.parameters()).device
    barriers = []
    for logits, targets in evaluation.outputs(forward, evaluation.Batches(data, device, batch_size)):
        K, B = logits.shape[:2]
        loss = F.cross_entropy(logits.flatten(0, 1).double(), targets.repeat(K), reduction="none").view(K, B)
        ends = (loss[values.index(0.0)] + loss[values.index(1.0)]) / 2
        barriers.append(loss.max(0).values - ends)
    return torch.cat(barriers).cpu()


def connectivity(barriers: Tensor, threshold: float, bins: int = 20) -> dict:
    """``{"fraction", "threshold", "histogram": {"edges", "counts"}, "mean_barrier"}``: the fraction of
    examples whose loss barrier is below ``threshold`` (linearly connected), and the histogram."""
    low, high = min(0.0, float(barriers.min())), max(float(barriers.max()), threshold)
    counts = torch.histc(barriers.double(), bins=bins, min=low, max=high if high > low else low + 1)
    edges = torch.linspace(low, high if high > low else low + 1, bins + 1, dtype=torch.float64)
    return {"fraction": float((barriers < threshold).double().mean()), "threshold": threshold,
            "histogram": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
            "mean_barrier": float(barriers.mean())}


# ----------------------------------------------------------------------------- claims


def _compare(a: float, b: float, spread: float) -> str:
    """Is ``a`` > ``b``? Supported beyond one std (``spread``), not supported below minus one, else inconclusive."""
    if a - b > spread:
        return "supported"
    if a - b < -spread:
        return "not supported"
    return "inconclusive"


def _matches(a: float, b: float, spread: float, seeds: int) -> str:
    """Does ``a`` match (or beat) ``b``? Supported unless lower by more than one std; one seed: inconclusive."""
    if seeds < 2:
        return "inconclusive"
    return "not supported" if b - a > spread else "supported"


def _spread(*stds: Optional[float]) -> float:
    return math.sqrt(sum((s or 0.0) ** 2 for s in stds))


def _held(entries: list[dict], dense: dict) -> float:
    """The lowest density whose mean accuracy lies within one (combined) std of the dense network's."""
    held = [e["density"] for e in entries
            if e["test_accuracy_mean"] >= dense["test_accuracy_mean"] - _spread(dense["test_accuracy_std"],
                                                                                 e["test_accuracy_std"])]
    return min(held) if held else 1.0


def trace_spread(entry: dict) -> float:
    """The error of an entry's Hessian trace: its std over seeds, or with one seed the probes' standard error."""
    return entry.get("hessian_trace_std") or entry["hessian_trace_stderr"]


def _trace(entry: dict) -> str:
    return f"{entry['hessian_trace']:.4g} ± {trace_spread(entry):.2g}"


def _pct(entry: dict, key: str) -> str:
    return f"{100 * entry[key + '_mean']:.2f} ± {100 * entry[key + '_std']:.2f}%"


def claims(arms: dict[str, list[dict]], per_example: dict[str, dict], seeds: int) -> list[dict]:
    """The papers' claims this run can speak to, each ``{"claim", "evidence", "verdict"}``, from
    the study's results: ``arms`` (entries per density, densest first, round 0 the dense network)
    and ``per_example`` (``connectivity`` per network). Claims whose arms were not run are left out."""
    out = []

    def add(claim: str, evidence: str, verdict: str):
        out.append({"claim": claim, "evidence": evidence, "verdict": verdict})

    last = {arm: entries[-1] for arm, entries in arms.items()}
    dense = next(iter(arms.values()))[0]
    if "real" in arms and "distilled" in arms:
        r, d = last["real"], last["distilled"]
        spread = _spread(r["test_accuracy_std"], d["test_accuracy_std"])
        cheaper = d["train_points_used"] < r["train_points_used"]
        ratio = r["train_points_used"] / max(1, d["train_points_used"])
        verdict = (_matches(d["test_accuracy_mean"], r["test_accuracy_mean"], spread, seeds) if cheaper
                   else "not supported")
        add("IMP with the distilled set in the inner loop matches IMP with real data (rewinding) in accuracy, "
            "spending far fewer training points",
            f"density {d['density']:.3f}: distilled {_pct(d, 'test_accuracy')} vs real {_pct(r, 'test_accuracy')}; "
            f"points {d['train_points_used']} vs {r['train_points_used']} ({ratio:.1f}x fewer)", verdict)
        add("Synthetic subnetworks are more stable to SGD noise: lower test error barrier than real-IMP subnetworks",
            f"density {d['density']:.3f}: error barrier distilled {_pct(d, 'barrier_error_test')} vs real "
            f"{_pct(r, 'barrier_error_test')}",
            _compare(r["barrier_error_test_mean"], d["barrier_error_test_mean"],
                     _spread(r["barrier_error_test_std"], d["barrier_error_test_std"])))
        if d["hessian_trace"] is not None and r["hessian_trace"] is not None:
            add("Synthetic subnetworks sit in flatter regions: smaller Hessian trace than real-IMP subnetworks",
                f"density {d['density']:.3f}: trace distilled {_trace(d)} vs real {_trace(r)}",
                _compare(r["hessian_trace"], d["hessian_trace"], _spread(trace_spread(r), trace_spread(d))))
    if "distilled" in arms:
        d = last["distilled"]
        spread = _spread(dense["barrier_error_test_std"], d["barrier_error_test_std"])
        add("Distilled masks are stable even where the dense network is not",
            f"test error barrier: dense {_pct(dense, 'barrier_error_test')}, distilled at density "
            f"{d['density']:.3f} {_pct(d, 'barrier_error_test')}",
            _compare(dense["barrier_error_test_mean"], d["barrier_error_test_mean"], spread)
            if dense["barrier_error_test_mean"] > spread else "inconclusive")
    if "hybrid" in arms and "real" in arms:
        h, r = _held(arms["hybrid"], dense), _held(arms["real"], dense)
        add("A hybrid (distilled rounds, then real IMP) reaches a higher sparsity at the dense accuracy than real IMP",
            f"lowest density within one std of the dense accuracy ({_pct(dense, 'test_accuracy')}): "
            f"hybrid {h:.3f}, real {r:.3f}", "supported" if h < r else "not supported" if h > r else "inconclusive")
    for arm, what in (("subset", "a small random subset"), ("easy", "the easiest (lowest-EL2N) examples")):
        if arm in arms and "real" in arms:
            a, r = last[arm], last["real"]
            add(f"A rewind point pre-trained on {what} is as good as one pre-trained on all the data",
                f"density {a['density']:.3f}: {arm} {_pct(a, 'test_accuracy')} vs real {_pct(r, 'test_accuracy')}",
                _matches(a["test_accuracy_mean"], r["test_accuracy_mean"],
                         _spread(a["test_accuracy_std"], r["test_accuracy_std"]), seeds))
    if "random" in arms:
        best = max((arm for arm in arms if arm != "random"), key=lambda arm: last[arm]["test_accuracy_mean"],
                   default=None)
        if best is not None:
            b, z = last[best], last["random"]
            add("Pruned masks beat random masks at the same density (the baseline the arms must clear)",
                f"density {z['density']:.3f}: {best} {_pct(b, 'test_accuracy')} vs random {_pct(z, 'test_accuracy')}",
                _compare(b["test_accuracy_mean"], z["test_accuracy_mean"],
                         _spread(b["test_accuracy_std"], z["test_accuracy_std"])))
    subnetworks = [arm for arm in arms if arm in per_example]
    if "dense" in per_example and subnetworks:
        fraction = per_example["dense"]["fraction"]
        drops = {arm: dense["test_accuracy_mean"] - last[arm]["test_accuracy_mean"] for arm in subnetworks}
        pairs = [(per_example[arm]["fraction"], -drops[arm]) for arm in subnetworks]
        rho = _rank_correlation(pairs) if len(pairs) >= 3 else None
        add("The fraction of training examples linearly mode connected predicts IMP's success "
            "(subnetworks with more connected examples lose less accuracy)",
            f"dense network: {100 * fraction:.1f}% of examples connected; last subnetworks: "
            + ", ".join(f"{arm} {100 * per_example[arm]['fraction']:.1f}% (accuracy drop {100 * drops[arm]:.2f} pts)"
                        for arm in subnetworks)
            + (f"; Spearman rho {rho:.2f}" if rho is not None else "; fewer than 3 subnetworks to correlate"),
            "inconclusive" if rho is None or abs(rho) < 0.5 else "supported" if rho > 0 else "not supported")
    return out


def _rank_correlation(pairs: list[tuple[float, float]]) -> float:
    """Spearman's rank correlation (ties by average rank); 0 where either side is constant."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    x, y = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return statistics.correlation(x, y)
