"""The study stage: the papers' experiments over seeds. Every pruning arm's masks (``study.arms``:
IMP with real data, with the distilled set, a hybrid, subset- or easy-pretrained rewind points,
random masks) measured at every density with ``study.seeds`` pairs of copies trained as one stack
(``fastmask.study.measure``: accuracy, instability, Hessian trace), per-example linear mode
connectivity of the dense network and each arm's last subnetwork, the loss landscape of each
arm's last subnetwork that the landscape stage does not draw (hybrid, subset, easy, random: the
plane through its masked rewind weights and seed 0's pair, with ``landscape.enabled``), and the
papers' claims judged from those numbers (``fastmask.study.claims``).

The masks: the real and distilled arms are the imp stage's own IMP runs (the same settings:
``imp.rounds``, ``imp.rate``, ``imp.rewind_step``, ``imp.scope``), read back through
``stages.imp.run_in_folder``, which finds them finished; the hybrid (``study.hybrid_rounds``
distilled rounds, then real ones), subset and easy arms (the rewind point pre-trained on
``study.subset_fraction`` of the training data at random, or on the ``study.easy_fraction``
lowest-EL2N examples, then real IMP) run the same way in ``study/imp_<arm>/``; the random arm is
the imp stage's random baseline (layer-wise random masks at the real arm's densities).

Resume: each (arm, density) is a unit of work (``units/study/<arm>_<round>.json``, written
atomically when measured; the dense network, which every arm rewound to the real arm's rewind
point shares, is the unit ``dense``); a rerun measures only what is missing. Under torchrun the
units are dealt out over the ranks.

Result: ``{"seeds", "stacked", "arms": {arm: [entry per density, densest first]},
"per_example_lmc": {network: {"fraction", "threshold", "histogram", "mean_barrier"}},
"curves": {network: seed 0's interpolation curves}, "landscapes": {arm: {"x", "y", "loss", "error",
"points", "xlabel", "ylabel"}}, "claims": [{"claim", "evidence", "verdict"}]}`` (network: ``dense`` and each arm's last
subnetwork; landscapes: as the landscape stage's, for the arms it does not draw); entries as ``fastmask.study.measure`` gives them
plus ``round`` and ``train_points_used``. ``{}`` when ``study.arms`` is empty (the default).

Stacks against stacks of one (``study.stacked=false``): the same study, every copy trained alone;
the results are the same up to float rounding, the time is what differs (README, "The study").
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from fastmask import distributed, io, plots, prune, study
from fastmask.stages import distill, imp
from fastmask.stages import hessian as hessian_stage
from fastmask.stages import landscape as landscape_stage
from fastmask.stages.base import Context, ReportContext, Stage, positive


@dataclasses.dataclass
class Config:
    arms: tuple[str, ...] = ()  # of fastmask.study.ARMS; empty: the stage does nothing
    seeds: int = 3  # pairs of copies (data orders) per density: 2 * seeds networks, one stack
    subset_fraction: float = 0.1  # the subset arm's rewind point: this fraction of the training data at random
    easy_fraction: float = 0.1  # the easy arm's: this fraction of the lowest-EL2N examples
    hybrid_rounds: int = 2  # the hybrid arm's distilled rounds, before its real ones
    lmc_threshold: float = 0.1  # an example is linearly connected when its loss barrier is below this
    histogram_bins: int = 20
    train_examples: int | None = 1024  # training examples of the train barriers and per-example LMC (None: all)
    test_examples: int | None = None  # test examples of the accuracies and test barriers (None: all)
    stacked: bool = True  # false: every copy trained alone (stacks of one), to measure what stacking buys
    stack_size: int | None = None  # copies per stack (None: as many as fit in memory, study.copies_per_stack)

    def __post_init__(self):
        unknown = sorted(set(self.arms) - set(study.ARMS))
        if unknown:
            raise ValueError(f"arms: unknown arm(s) {unknown}; arms are {list(study.ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must not repeat an arm, got {list(self.arms)}")
        positive("seeds", self.seeds)
        for key in ("subset_fraction", "easy_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key} must lie in (0, 1], got {getattr(self, key)}")
        positive("hybrid_rounds", self.hybrid_rounds)
        if not self.lmc_threshold > 0:
            raise ValueError(f"lmc_threshold must be positive, got {self.lmc_threshold}")
        positive("histogram_bins", self.histogram_bins)
        for key in ("train_examples", "test_examples"):
            if getattr(self, key) is not None:
                positive(key, getattr(self, key))
        if self.stack_size is not None:
            positive("stack_size", self.stack_size)

    def check_with(self, cfg) -> None:
        """The checks that need other sections (``fastmask.config.load_config`` calls it)."""
        needs = [arm for arm in self.arms if arm in study.NEEDS_DISTILLED]
        if needs and cfg.distill.method == "random":
            raise ValueError(f"study.arms: {needs} need a distilled set, but distillation is off "
                             "(distill.method='random' keeps random real images)")
        if "hybrid" in self.arms and self.hybrid_rounds >= cfg.imp.rounds:
            raise ValueError(f"study.hybrid_rounds ({self.hybrid_rounds}) must be below imp.rounds "
                             f"({cfg.imp.rounds}): the hybrid's real rounds come after them")
        diet = [arm for arm in self.arms if arm in ("subset", "easy")]
        if diet and cfg.imp.rewind_step == 0:
            raise ValueError(f"study.arms: {diet} pre-train the rewind point, which needs imp.rewind_step > 0")
        if self.arms and cfg.imp.rounds < 1:
            raise ValueError("study.arms needs imp.rounds >= 1 (densities below 1)")


def _strategy(ctx: Context, model, inner, pretrain=None) -> prune.IMP:
    cfg = ctx.cfg
    needs_distilled = "distilled" in ([inner] if isinstance(inner, str) else inner)
    return prune.IMP(model, ctx.splits, cfg.imp.rounds, cfg.imp.rate, cfg.imp.rewind_step, inner,
                     distilled=distill.synthetic(ctx) if needs_distilled else None,
                     subset_fraction=cfg.study.subset_fraction, easy_fraction=cfg.study.easy_fraction,
                     scope=cfg.imp.scope, inner_cfg=cfg.inner_train, retrain_cfg=cfg.train, seed=cfg.seed,
                     progress=ctx.progress, pretrain=pretrain)


def arm_masks(ctx: Context, arm: str, model) -> tuple[dict, list[dict], list[int]]:
    """(rewind weights, masks per round, training points spent per round) of ``arm``."""
    cfg = ctx.cfg
    if arm in ("real", "distilled", "random"):  # the imp stage's runs, finished: read back, not rerun
        found = imp.run_in_folder(_strategy(ctx, model, "distilled" if arm == "distilled" else "real"),
                                  ctx.path("imp_distilled" if arm == "distilled" else "imp_real"), retrain=False)
        if arm != "random":
            return found.rewind_weights, found.masks, [r["train_points_used"] for r in found.rounds]
        # the imp stage's random baseline: the same masks
        masks = [prune.random_masks(model, r["density"], "layer", seed=cfg.seed + i)
                 for i, r in enumerate(found.rounds)]
        return found.rewind_weights, masks, [0] * len(masks)
    if arm == "hybrid":
        inner = ["distilled"] * cfg.study.hybrid_rounds + ["real"] * (cfg.imp.rounds - cfg.study.hybrid_rounds)
        strategy = _strategy(ctx, model, inner)
    else:  # subset, easy: the Data Diet rewind point, then real IMP
        strategy = _strategy(ctx, model, "real", pretrain=arm)
    found = imp.run_in_folder(strategy, ctx.path("study", f"imp_{arm}"), retrain=False)
    return found.rewind_weights, found.masks, [r["train_points_used"] for r in found.rounds]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    arms = cfg.study.arms
    if not arms:
        return {}
    model = ctx.build_model()
    found = {arm: arm_masks(ctx, arm, model) for arm in arms}
    dense_rewind = arm_masks(ctx, "real", model)[0] if "real" not in found else found["real"][0]
    train = ctx.splits.train
    hessian_batches = hessian_stage.batches_of(ctx)
    units = {"dense": (None, dense_rewind, True)}  # unit -> (masks, rewind, per-example LMC too)
    names = {}  # (arm, round) -> unit
    for arm, (rewind, masks, _) in found.items():
        for r, mask in enumerate(masks):
            if r == 0 and _same(rewind, dense_rewind):
                names[arm, r] = "dense"
                continue
            names[arm, r] = f"{arm}_{r}"
            units[names[arm, r]] = (mask, rewind, r == len(masks) - 1)
    # the landscape stage draws the imp stage's networks; the study draws its other arms' last subnetworks
    planes = {names[arm, len(masks) - 1]: arm for arm, (_, masks, _) in found.items()
              if arm not in imp.NETWORKS} if cfg.landscape.enabled else {}

    def compute(unit: str) -> dict:
        masks, rewind, per_example = units[unit]
        entry, pair = study.measure(model, masks, rewind, ctx.splits, cfg.train, cfg.study.seeds, seed=cfg.seed,
                                    alphas=cfg.lmc.alphas, train_examples=cfg.study.train_examples,
                                    test_examples=cfg.study.test_examples,
                                    hessian_batches=hessian_batches, hessian_probes=cfg.hessian.num_probes,
                                    stack_size=(cfg.study.stack_size if cfg.study.stacked else 1),
                                    progress=ctx.progress)
        if per_example:
            barriers = study.per_example_barriers(*pair, cfg.lmc.alphas,
                                                  study.first_examples(train, cfg.study.train_examples))
            entry["per_example_lmc"] = study.connectivity(barriers, cfg.study.lmc_threshold, cfg.study.histogram_bins)
        if unit in planes:
            test = study.first_examples(ctx.splits.test, cfg.study.test_examples)
            entry["landscape"] = landscape_stage.measure_plane(ctx, copy.deepcopy(model), masks, rewind, pair, test)
        ctx.log({"stage": "study", "unit": unit, "test_accuracy_mean": entry["test_accuracy_mean"],
                 "barrier_error_test_mean": entry["barrier_error_test_mean"]})
        return entry

    measured = distributed.map_units(list(units), compute, ctx.path("units", "study"))
    out_arms, per_example = {}, {"dense": measured["dense"]["per_example_lmc"]}
    curves = {"dense": measured["dense"]["curve_seed0"]}
    # (a unit measured before the study drew planes has none: a resumed old run leaves that arm out)
    landscapes = {arm: measured[unit]["landscape"] for unit, arm in planes.items() if "landscape" in measured[unit]}
    for arm, (_, masks, points) in found.items():
        entries = []
        for r in range(len(masks)):
            entry = {key: value for key, value in measured[names[arm, r]].items()
                     if key not in ("per_example_lmc", "curve_seed0", "landscape")}
            entries.append({"round": r, **entry, "train_points_used": points[r]})
        out_arms[arm] = entries
        last = measured[names[arm, len(masks) - 1]]
        per_example[arm], curves[arm] = last["per_example_lmc"], last["curve_seed0"]
    return {"seeds": cfg.study.seeds, "stacked": cfg.study.stacked, "arms": out_arms, "per_example_lmc": per_example,
            "curves": curves, "landscapes": landscapes, "claims": study.claims(out_arms, per_example, cfg.study.seeds)}


def report(result: dict, ctx: ReportContext) -> list[str]:
    arms, seeds = result["arms"], result["seeds"]
    lines = [f"Every density of every arm retrained from its rewind point with {seeds} seed(s), "
             f"2 copies each (different data orders), {'as one stack' if result['stacked'] else 'one network at a time'}"
             "; mean ± std over seeds. Barriers: the two copies interpolated.", "",
             "| arm | density | test accuracy | test error barrier | train error barrier | test loss barrier | "
             "Hessian trace | training points |", "|---|---|---|---|---|---|---|---|"]
    for arm, entries in arms.items():
        for e in entries:
            trace = "" if e["hessian_trace"] is None else f"{e['hessian_trace']:.4g} ± {study.trace_spread(e):.2g}"
            lines.append(f"| {arm} | {e['density']:.4f} | {100 * e['test_accuracy_mean']:.2f} ± "
                         f"{100 * e['test_accuracy_std']:.2f}% | {100 * e['barrier_error_test_mean']:.2f} ± "
                         f"{100 * e['barrier_error_test_std']:.2f}% | {100 * e['barrier_error_train_mean']:.2f} ± "
                         f"{100 * e['barrier_error_train_std']:.2f}% | {e['barrier_loss_test_mean']:.4f} | {trace} | "
                         f"{e['train_points_used']} |")
    lines += ["", "Per-example linear mode connectivity (seed 0's pair, training examples): the fraction whose "
              "loss barrier lies below the threshold.", "", "| network | fraction connected | threshold | mean barrier |",
              "|---|---|---|---|"]
    for network, lmc_result in result["per_example_lmc"].items():
        lines.append(f"| {network} | {100 * lmc_result['fraction']:.1f}% | {lmc_result['threshold']:g} | "
                     f"{lmc_result['mean_barrier']:.4f} |")
    lines += ["", "### Claims", "", "| claim | evidence (this run) | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['evidence']} | **{c['verdict']}** |" for c in result["claims"]]
    lines += ["", "Verdicts: a difference beyond one standard deviation (over seeds; with one seed the Hessian's "
              "probes' standard error) decides; within it, \"inconclusive\" (for a claim that one arm matches another: \"supported\").", ""]
    names = [plots.study_accuracy(arms, ctx.plots / "study_accuracy.png"),
             plots.study_barriers(arms, ctx.plots / "study_barriers.png"),
             plots.study_hessian(arms, ctx.plots / "study_hessian.png"),
             plots.study_curves(result["curves"], ctx.plots / "study_curves.png"),
             plots.study_per_example(result["per_example_lmc"], ctx.plots / "study_per_example_lmc.png")]
    lines += [f"![{path.stem}](plots/{path.name})" for path in names if path is not None]
    if result.get("landscapes"):
        lines += ["", "The loss landscape of the arms the landscape stage does not draw: the plane through the "
                  "masked rewind weights and seed 0's two copies, at the last density.", ""]
        for arm, entry in result["landscapes"].items():
            path = landscape_stage.draw_plane(entry, ctx.plots / f"study_landscape_{arm}.png",
                                              f"the {arm} arm's last subnetwork", ctx.subject(),
                                              "w0: the rewind weights (masked); w1, w2: seed 0's two copies")
            lines.append(f"![study landscape {arm}](plots/{path.name})")
    return lines + [""]


def summary(result: dict) -> str:
    last = ", ".join(f"{arm} {100 * entries[-1]['test_accuracy_mean']:.1f} ± {100 * entries[-1]['test_accuracy_std']:.1f}%"
                     for arm, entries in result["arms"].items())
    verdicts = [claim["verdict"] for claim in result["claims"]]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in study.VERDICTS if v in verdicts)
    return f"at the last density: {last}; claims: {counts}"


STAGE = Stage("study", "Every arm over seeds", run, report, config=Config, files=("study",), summary=summary)
