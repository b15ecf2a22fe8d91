"""What the report's plots share: one colour and one name per kind of network, the words that
name the run in every title, and the atomic PNG writer.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas, never through
``pyplot``, so making a report changes no global matplotlib state of the caller's.

Example::

    figure, axes = plots.figure()
    axes.plot(x, y, color=plots.COLOURS["real"], label=plots.LABELS["real"])
    axes.set_title(f"test accuracy\n{plots.subject(folder, 'convnet3', 'digits')}")
    plots.save(figure, folder / "plots" / "curve.png")
"""
from __future__ import annotations

import io as _io
from pathlib import Path

from matplotlib.figure import Figure

from fastmask import io

COLOURS = {"real": "tab:blue", "distilled": "tab:orange", "random": "tab:gray", "dense": "tab:green"}
# The legend's words for each kind of network (the report's tables use the short keys).
LABELS = {"real": "IMP, real data in the inner loop", "distilled": "IMP, distilled data in the inner loop",
          "random": "random pruning", "dense": "dense (unpruned)"}


def subject(folder, model: str, dataset: str) -> str:
    """The words every plot's title ends with: which network, on which data, in which run folder."""
    return f"{model} on {dataset}, run {Path(folder).name}"


def figure(rows: int = 1, columns: int = 1, size: tuple[float, float] = (6, 4)):
    """A new figure and its axes (one, or an array for several rows or columns)."""
    fig = Figure(figsize=size, layout="constrained")  # labels, titles and legends never overlap
    return fig, fig.subplots(rows, columns)


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically.

    The figures' constrained layout keeps every label, title and legend inside the figure, so the
    PNG is the whole figure: ``bbox_inches="tight"`` would draw it a second time to find the
    crop (measured: 20-25% of a report figure's 120-170 ms to save, on the 2-core CPU machine).
    """
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return io.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


# ----------------------------------------------------------------------------- the study stage's plots

STUDY_COLOURS = {"hybrid": "tab:purple", "subset": "tab:brown", "easy": "tab:olive"}


def _arm_colour(arm: str):
    return COLOURS.get(arm) or STUDY_COLOURS.get(arm)


def _density_axis(ax, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right, as the papers draw it
    ax.set_xlabel("density (fraction of weights kept, log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def _band(ax, arm: str, entries: list[dict], key: str, scale: float = 100.0) -> None:
    """Mean over seeds as a line, mean ± std as a band."""
    density = [e["density"] for e in entries]
    mean = [scale * e[f"{key}_mean"] for e in entries]
    std = [scale * e[f"{key}_std"] for e in entries]
    colour = _arm_colour(arm)
    ax.plot(density, mean, "o-", label=arm, color=colour)
    ax.fill_between(density, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    color=colour)


def study_accuracy(arms: dict[str, list[dict]], path: Path) -> Path:
    """Test accuracy vs density, one line (mean over seeds) and band (± std) per arm."""
    fig, ax = figure()
    for arm, entries in arms.items():
        _band(ax, arm, entries, "test_accuracy")
    _density_axis(ax, "test accuracy after retraining (%, mean ± std over seeds)")
    return save(fig, path)


def study_barriers(arms: dict[str, list[dict]], path: Path) -> Path:
    """Error barrier between the two copies vs density, per arm, on the train and the test data."""
    fig, axes = figure(1, 2, size=(11, 4))
    for ax, split in zip(axes, ("train", "test")):
        for arm, entries in arms.items():
            _band(ax, arm, entries, f"barrier_error_{split}")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{split} data")
        _density_axis(ax, "error barrier (percentage points, mean ± std)")
    return save(fig, path)


def study_hessian(arms: dict[str, list[dict]], path: Path) -> Path | None:
    """Hessian trace (Hutchinson) vs density, per arm: the mean over seeds ± the std over seeds (with
    one seed, ± the probes' standard error: ``fastmask.study.trace_spread``)."""
    from fastmask.study import trace_spread  # the study's rule; torch is loaded by the time a report is drawn

    fig, ax = figure()
    drawn = False
    for arm, entries in arms.items():
        points = [e for e in entries if e.get("hessian_trace") is not None]
        if points:
            ax.errorbar([e["density"] for e in points], [e["hessian_trace"] for e in points],
                        yerr=[trace_spread(e) for e in points], fmt="o-", capsize=3, label=arm,
                        color=_arm_colour(arm))
            drawn = True
    if not drawn:
        return None
    _density_axis(ax, "Hessian trace of the training loss (± std over seeds; one seed: ± stderr)")
    return save(fig, path)


def study_per_example(per_example: dict[str, dict], path: Path) -> Path:
    """Histograms of the per-example loss barriers, one per network, with the threshold marked."""
    fig, ax = figure(size=(7, 4))
    for network, result in per_example.items():
        edges, counts = result["histogram"]["edges"], result["histogram"]["counts"]
        total = max(1, sum(counts))
        ax.stairs([c / total for c in counts], edges, label=f"{network} ({100 * result['fraction']:.0f}% connected)",
                  color=_arm_colour(network))
    threshold = next(iter(per_example.values()))["threshold"]
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("per-example loss barrier along the path between the two copies (nats)")
    ax.set_ylabel("fraction of training examples")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


def study_curves(curves: dict[str, dict], path: Path) -> Path:
    """Seed 0's interpolation curves (error and loss, train dashed, test solid) of the dense network
    and each arm's last subnetwork."""
    fig, axes = figure(1, 2, size=(11, 4))
    for ax, quantity in zip(axes, ("error", "loss")):
        for network, curve in curves.items():
            colour = _arm_colour(network)
            scale = 100.0 if quantity == "error" else 1.0
            ax.plot(curve["alphas"], [scale * v for v in curve[f"test_{quantity}"]], "-", color=colour,
                    label=f"{network} test")
            ax.plot(curve["alphas"], [scale * v for v in curve[f"train_{quantity}"]], "--", color=colour,
                    label=f"{network} train")
        ax.set_xlabel("alpha (0: copy a, 1: copy b)")
        ax.set_ylabel("error (%)" if quantity == "error" else "cross-entropy loss (nats)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", ncol=2)
    fig.suptitle("interpolation between the two copies at the last density (seed 0)")
    return save(fig, path)
