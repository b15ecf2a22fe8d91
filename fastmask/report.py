"""``report.md`` and its plots, rebuilt from a run folder's ``results.json`` (``fastmask report DIR``).

Plots (``plots/``): test accuracy against density for real-data IMP, distilled IMP and random
pruning; training points spent per mask; LMC curves (error and loss, train and test) per analysed
network; the Hessian diagonals' histograms; the distilled images and loss landscapes are drawn by
their stages. Everything is written atomically.
"""
from __future__ import annotations

import io as _io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastmask import io  # noqa: E402

COLOURS = {"real": "tab:blue", "distilled": "tab:orange", "random": "tab:gray", "dense": "tab:green"}


def _save(fig, path: Path):
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    io.atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _plot_imp(imp: dict, dense: dict | None, plots: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, rounds in imp.items():
        ax.plot([r["density"] for r in rounds], [100 * r["test_accuracy"] for r in rounds], "o-", label=kind,
                color=COLOURS.get(kind))
    if dense:
        ax.axhline(100 * dense["test_accuracy"], color=COLOURS["dense"], ls="--", label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density (fraction of weights kept)")
    ax.set_ylabel("test accuracy after retraining (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, plots / "accuracy_vs_density.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("real", "distilled"):
        if kind in imp:
            ax.plot([r["round"] for r in imp[kind]], [r["train_points_used"] for r in imp[kind]], "o-", label=kind,
                    color=COLOURS[kind])
    ax.set_xlabel("IMP round")
    ax.set_ylabel("training points spent to find the mask")
    ax.set_yscale("symlog")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, plots / "train_points.png")
    return ["accuracy_vs_density.png", "train_points.png"]


def _plot_lmc(lmc: dict, plots: Path) -> list[str]:
    names = []
    for kind, entry in lmc.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, quantity in zip(axes, ("error", "loss")):
            for split, style in (("train", "--"), ("test", "-")):
                ax.plot(entry["alphas"], entry[f"{split}_{quantity}"], style, label=split, color=COLOURS.get(kind))
            if "bn_reset" in entry:
                ax.plot(entry["alphas"], entry["bn_reset"][f"test_{quantity}"], ":", label="test, BN reset",
                        color="black")
            ax.set_xlabel("alpha")
            ax.set_ylabel(quantity)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{kind} (density {entry['density']:.3f}): barrier {100 * entry['barrier_error']:.2f}% error, "
                     f"{entry['barrier_loss']:.3f} loss")
        name = f"lmc_{kind}.png"
        _save(fig, plots / name)
        names.append(name)
    return names


def _plot_hessian(folder: Path, kinds, plots: Path) -> str | None:
    import torch

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for kind in kinds:
        file = folder / "checkpoints" / f"hessian_{kind}.safetensors"
        if not file.exists():
            continue
        values = torch.cat([t.flatten() for t in io.load_tensors(file).values()])
        values = values[values != 0].abs().clamp_min(1e-12).log10()
        ax.hist(values.numpy(), bins=60, histtype="step", label=kind, color=COLOURS.get(kind), density=True)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("log10 |Hessian diagonal entry| (unpruned weights)")
    ax.set_ylabel("density")
    ax.legend()
    _save(fig, plots / "hessian_diag.png")
    return "hessian_diag.png"


def write_report(folder) -> Path:
    """Rebuild ``report.md`` and the plots of run folder ``folder``; returns the report's path."""
    folder = Path(folder)
    results_file = folder / "results.json"
    if not results_file.exists():
        raise FileNotFoundError(f"{folder} has no results.json: not a fastmask run folder (or nothing finished yet)")
    results = json.loads(results_file.read_text())
    stages = results["stages"]
    plots = folder / "plots"
    lines = [f"# fastmask run: {folder.name}", "",
             f"fastmask {results['fastmask_version']} on {results['device']['type']} "
             f"({results['device']['name']}); dataset `{results['config']['data']['name']}`, "
             f"model `{results['config']['model']['name']}`.", ""]
    if "distill" in stages:
        d = stages["distill"]
        lines += ["## Distilled set", "",
                  f"{d['method']}, {d['images_per_class']} images per class ({d['num_images']} images) in "
                  f"{d['seconds']:.1f} s. Networks trained on it alone: test accuracy "
                  f"{100 * d['syn_test_accuracy']:.1f} ± {100 * d.get('syn_test_accuracy_std', 0):.1f}%.", ""]
        if (plots / "distilled.png").exists():
            lines += ["![distilled images](plots/distilled.png)", ""]
    if "dense" in stages:
        lines += ["## Dense network", "", f"Test accuracy {100 * stages['dense']['test_accuracy']:.2f}%.", ""]
    if "imp" in stages:
        imp = stages["imp"]
        names = _plot_imp(imp, stages.get("dense"), plots)
        lines += ["## Iterative magnitude pruning", "",
                  "| round | density | " + " | ".join(f"{k} accuracy" for k in imp) + " | real points | distilled points |",
                  "|---|---|" + "---|" * len(imp) + "---|---|"]
        for i, record in enumerate(imp["real"]):
            accuracies = " | ".join(f"{100 * imp[k][i]['test_accuracy']:.2f}%" if i < len(imp[k]) else "" for k in imp)
            points = [imp[k][i]["train_points_used"] if k in imp and i < len(imp[k]) else "" for k in ("real", "distilled")]
            lines.append(f"| {i} | {record['density']:.4f} | {accuracies} | {points[0]} | {points[1]} |")
        lines += [""] + [f"![{n}](plots/{n})" for n in names] + [""]
    if "lmc" in stages:
        lines += ["## Linear mode connectivity", "", "| network | density | test error barrier | test loss barrier |"
                  " train error barrier |", "|---|---|---|---|---|"]
        for kind, entry in stages["lmc"].items():
            lines.append(f"| {kind} | {entry['density']:.4f} | {100 * entry['barrier_error']:.2f}% | "
                         f"{entry['barrier_loss']:.4f} | {100 * entry['train_barrier_error']:.2f}% |")
        lines += [""] + [f"![{n}](plots/{n})" for n in _plot_lmc(stages["lmc"], plots)] + [""]
    if stages.get("landscape"):
        lines += ["## Loss landscape", "", "The plane through the rewind weights and the two LMC copies.", ""]
        lines += [f"![landscape {k}](plots/landscape_{k}.png)" for k in stages["landscape"]] + [""]
    if "hessian" in stages:
        lines += ["## Hessian diagonal (Hutchinson)", "", "| network | trace | ± stderr | mean diag | max diag | probes |",
                  "|---|---|---|---|---|---|"]
        for kind, h in stages["hessian"].items():
            lines.append(f"| {kind} | {h['trace']:.4g} | {h['trace_stderr']:.2g} | {h['diag_mean']:.3g} | "
                         f"{h['diag_max']:.3g} | {h['num_probes']} |")
        name = _plot_hessian(folder, stages["hessian"], plots)
        lines += ["", f"![Hessian diagonal]({'plots/' + name})" if name else "", ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in results["timings"].items()]
    lines.append(f"| total | {sum(results['timings'].values()):.1f} |")
    return io.write_text(folder / "report.md", "\n".join(lines) + "\n")
