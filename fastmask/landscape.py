"""2-D loss landscapes: a grid of networks on a plane in weight space, evaluated as stacks.

- ``plane(w0, w1, w2, data)``: the plane through three weight sets (e.g. the initialisation and
  two trained copies), in the orthonormal coordinates of Garipov et al. (2018): with
  ``u = w1 - w0`` and ``v = w2 - w0`` over the (masked) parameters, ``e1 = u / |u|`` and ``e2`` the
  unit vector of ``v - (v . e1) e1``; the point ``(x, y)`` is ``w0 + x e1 + y e2``, so distances on
  the plot are Euclidean distances in parameter space. ``w0`` sits at (0, 0), ``w1`` at
  ``(|u|, 0)``, ``w2`` at ``(v . e1, |v - (v . e1) e1|)``; the grid covers the three with a margin.
  Every point is an affine combination ``c0 w0 + c1 w1 + c2 w2`` (``c0 + c1 + c2 = 1``) that is
  applied to every floating tensor, BatchNorm running statistics included. Outside the triangle
  some ``c`` are negative and a combined running variance can turn negative (NaN loss there):
  pass ``bn_reset_data`` to recompute the statistics of every point, as Garipov et al. do.
- ``random_directions(model, data)``: ``model + x d1 + y d2`` for two random Gaussian directions,
  filter-normalised as Li et al. (2018): each filter (slice along the first dimension) of a weight
  with two or more dimensions is scaled to the norm of the model's filter; parameters with one
  dimension (biases, normalisation parameters) and buffers get a zero direction, and pruned
  weights stay pruned (the direction is masked). The grid spans ``[-span, span]^2``.

Each grid point is a network; chunks of points run as one stack (``fastmask.combinations``: the
data is read once per chunk, K networks per batch), chunked to fit memory. The result holds the
coordinates, the loss and error grids, and writes a contour plot with ``save_plot``.

Example::

    from fastmask import landscape
    result = landscape.plane(init_model, trained_a, trained_b, splits.test, grid=(21, 21))
    result.save_plot("plots/plane.png")
    around = landscape.random_directions(trained_a, splits.test, grid=(21, 21), seed=0)
    around.save_plot("plots/random.png", what="error")
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from fastmask.combinations import aligned_sources, check_models, evaluate_combinations
from fastmask.evaluation import LossFn
from fastmask.nn import is_masked

__all__ = ["LandscapeResult", "plane", "random_directions"]

DEFAULT_GRID = (21, 21)
PLANE_XLABEL = "distance along w1 - w0"  # the axes of ``plane``'s results
PLANE_YLABEL = "orthogonal distance towards w2"


@dataclasses.dataclass
class LandscapeResult:
    """Loss and error (1 - accuracy) on a grid: ``loss[i, j]`` is at ``(x[j], y[i])``.

    ``points`` names marked positions (the weight sets the plane goes through, or the centre).
    """

    x: np.ndarray  # [nx]
    y: np.ndarray  # [ny]
    loss: np.ndarray  # [ny, nx]
    error: np.ndarray  # [ny, nx]
    points: dict[str, tuple[float, float]]
    xlabel: str = "x"
    ylabel: str = "y"

    def __repr__(self) -> str:  # the grid's extent and extremes, never its arrays
        points = ", ".join(self.points)
        return (f"LandscapeResult({len(self.x)} x {len(self.y)} grid, loss {np.nanmin(self.loss):.4g} to "
                f"{np.nanmax(self.loss):.4g}, error {100 * np.nanmin(self.error):.1f}% to "
                f"{100 * np.nanmax(self.error):.1f}%, points {points})")

    def to_dict(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist(), "loss": self.loss.tolist(), "error": self.error.tolist(),
                "points": {name: list(p) for name, p in self.points.items()}, "xlabel": self.xlabel,
                "ylabel": self.ylabel}

    @classmethod
    def from_dict(cls, entry: dict) -> "LandscapeResult":
        """The result ``to_dict`` gave (as stored in ``results.json``), e.g. to draw it again.

        Example::

            LandscapeResult.from_dict(result.to_dict()).save_plot("plane.png")
        """
        return cls(np.asarray(entry["x"], dtype=float), np.asarray(entry["y"], dtype=float),
                   np.asarray(entry["loss"], dtype=float), np.asarray(entry["error"], dtype=float),
                   {name: tuple(p) for name, p in entry["points"].items()},
                   **{key: entry[key] for key in ("xlabel", "ylabel") if key in entry})  # older runs stored none

    def save_plot(self, path: str | os.PathLike, what: str = "loss", levels: int = 30, title: str | None = None,
                  markers: str | None = None) -> Path:
        """Write a filled contour plot of ``what`` (``"loss"`` or ``"error"``, in percent) as a PNG,
        atomically, under ``title``; ``markers`` says what the marked points are (under the plot).

        The plot is square whatever the extent of each axis (a plane through two nearby trained
        copies is far longer than wide): the axes' tick labels give the distances.

        Example::

            result.save_plot("plane.png", title="ConvNet-3, dense", markers="w0: init; w1, w2: trained copies")
        """
        if what not in ("loss", "error"):
            raise ValueError(f"what must be 'loss' or 'error', got {what!r}")
        from matplotlib.figure import Figure  # the Agg canvas, without touching pyplot's global backend
        from matplotlib.ticker import MaxNLocator

        from fastmask import plots

        values = np.ma.masked_invalid(self.loss if what == "loss" else 100 * self.error)
        figure = Figure(figsize=(6, 5.6), dpi=120, layout="constrained")
        axes = figure.subplots()
        filled = axes.contourf(self.x, self.y, values, levels=levels, cmap="viridis")
        axes.contour(self.x, self.y, values, levels=filled.levels, colors="black", linewidths=0.3, alpha=0.5)
        colorbar = figure.colorbar(filled, ax=axes, shrink=0.85, label="loss" if what == "loss" else "error (%)")
        colorbar.locator = MaxNLocator(7)  # a few readable labels, not one per contour level
        colorbar.update_ticks()
        for name, (px, py) in self.points.items():
            axes.plot(px, py, "o", color="white", markeredgecolor="black")
            axes.annotate(name, (px, py), textcoords="offset points", xytext=(5, 5), color="white", fontweight="bold")
        axes.set_xlabel(self.xlabel)
        axes.set_ylabel(self.ylabel)
        axes.set_box_aspect(1)
        axes.xaxis.set_major_locator(MaxNLocator(6))
        axes.yaxis.set_major_locator(MaxNLocator(6))
        if title:
            axes.set_title(title, fontsize=10)
        if markers:
            figure.supxlabel(markers, fontsize=8)  # under the plot, inside the constrained layout
        return plots.save(figure, Path(path), dpi=120)


def _check_grid(grid) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    grid = tuple(grid)
    if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in grid):
        raise ValueError(f"grid must be an int or a pair (nx, ny) of ints >= 2, got {grid!r}")
    return grid


def _effective_parameters(model: nn.Module) -> list[Tensor]:
    """The model's parameters as the network uses them: masked weights times their mask."""
    masks = {id(m.weight): m.mask for m in model.modules() if is_masked(m)}
    return [p.detach() * masks[id(p)] if id(p) in masks else p.detach() for p in model.parameters()]


def _dot(xs: list[Tensor], ys: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def _evaluate(sources, coefficients: np.ndarray, data, grid, loss_fn, bn_reset_data, batch_size, chunk, progress):
    nx, ny = grid
    loss, error = evaluate_combinations(sources, torch.from_numpy(coefficients), data, loss_fn=loss_fn,
                                        bn_reset_data=bn_reset_data, batch_size=batch_size, chunk=chunk,
                                        progress=progress, what="grid points")
    return np.array(loss).reshape(ny, nx), np.array(error).reshape(ny, nx)


def plane(w0: nn.Module, w1: nn.Module, w2: nn.Module, data, grid=DEFAULT_GRID, *, margin: float = 0.2,
          loss_fn: Optional[LossFn] = None, bn_reset_data=None, batch_size: Optional[int] = None,
          chunk: Optional[int] = None, progress: bool = False) -> LandscapeResult:
    """Loss and error on the plane through three weight sets (coordinates: see the module docstring).

    Args:
        w0, w1, w2: three models of one architecture on one device (e.g. init, two trained copies).
        data: a fastmask ``Dataset`` or an iterable of ``(inputs, targets)`` batches.
        grid: points ``(nx, ny)`` (or one int for both).
        margin: the grid extends this fraction of the three points' extent beyond them on each side.
        loss_fn, bn_reset_data, batch_size, chunk, progress: as ``fastmask.lmc.interpolate``.

    Example::

        result = plane(init, trained_a, trained_b, splits.test, grid=(21, 21), bn_reset_data=splits.train)
    """
    check_models([w0, w1, w2], ["w0", "w1", "w2"])
    nx, ny = _check_grid(grid)
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    p0, p1, p2 = (_effective_parameters(w) for w in (w0, w1, w2))
    u = [b - a for a, b in zip(p0, p1)]
    v = [b - a for a, b in zip(p0, p2)]
    u_norm = math.sqrt(_dot(u, u))
    v_norm = math.sqrt(_dot(v, v))
    along = _dot(u, v) / u_norm if u_norm > 0 else 0.0  # v . e1
    across = math.sqrt(max(v_norm**2 - along**2, 0.0))  # |v - (v . e1) e1|
    if u_norm == 0 or across <= 1e-6 * max(v_norm, u_norm):
        raise ValueError("w0, w1 and w2 must not lie on one line in parameter space (no plane goes through them)")
    points = {"w0": (0.0, 0.0), "w1": (u_norm, 0.0), "w2": (along, across)}
    xs_marked, ys_marked = [p[0] for p in points.values()], [p[1] for p in points.values()]
    x_lo, x_hi, y_lo, y_hi = min(xs_marked), max(xs_marked), min(ys_marked), max(ys_marked)
    x_pad, y_pad = margin * (x_hi - x_lo), margin * (y_hi - y_lo)
    x = np.linspace(x_lo - x_pad, x_hi + x_pad, nx)
    y = np.linspace(y_lo - y_pad, y_hi + y_pad, ny)
    gx, gy = np.meshgrid(x, y)  # [ny, nx], row-major: y outer, x inner
    # w0 + x e1 + y e2 with e1 = u / |u|, e2 = (v - along e1) / across, written on (w0, w1, w2):
    c2 = gy / across
    c1 = gx / u_norm - c2 * along / u_norm
    coefficients = np.stack([1 - c1 - c2, c1, c2], axis=-1).reshape(-1, 3)
    sources = aligned_sources([w0, w1, w2])
    loss, error = _evaluate(sources, coefficients, data, (nx, ny), loss_fn, bn_reset_data, batch_size, chunk, progress)
    return LandscapeResult(x, y, loss, error, points, xlabel=PLANE_XLABEL, ylabel=PLANE_YLABEL)


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A random direction ``{parameter name: tensor}`` filter-normalised to ``model`` (Li et al.):
    Gaussian, masked like the weights, each filter scaled to the norm of the model's (masked)
    filter; zero for parameters with one dimension. Drawn on the CPU, so the same on every device."""
    masks = {id(m.weight): m.mask for m in model.modules() if is_masked(m)}
    direction = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        w = p.detach()
        if id(p) in masks:
            d = d * masks[id(p)]
            w = w * masks[id(p)]
        w_norms = w.flatten(1).double().norm(dim=1)
        d_norms = d.flatten(1).double().norm(dim=1)
        scale = torch.where(d_norms > 0, w_norms / d_norms.clamp_min(1e-300), torch.zeros_like(d_norms))
        direction[name] = (d.double() * scale.view(-1, *([1] * (p.dim() - 1)))).to(p.dtype)
    return direction


def _direction_model(model: nn.Module, direction: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``direction`` as its parameters and zero floating buffers (masks kept)."""
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(direction[name])
        for name, b in holder.named_buffers():
            if b.is_floating_point():
                b.zero_()
    return holder


def random_directions(model: nn.Module, data, grid=DEFAULT_GRID, *, span: float = 1.0, seed: int = 0,
                      loss_fn: Optional[LossFn] = None, bn_reset_data=None,
                      batch_size: Optional[int] = None, chunk: Optional[int] = None,
                      progress: bool = False) -> LandscapeResult:
    """Loss and error around ``model`` along two filter-normalised random directions (Li et al.).

    The point ``(x, y)`` of the grid over ``[-span, span]^2`` is ``model + x d1 + y d2`` (see the
    module docstring); ``seed`` draws d1 and d2. Other arguments as ``plane``.

    Example::

        result = random_directions(model, splits.test, grid=(21, 21), seed=0)
        result.loss[10, 10]        # the model itself (the centre of a 21 x 21 grid)
    """
    check_models([model], ["model"])
    nx, ny = _check_grid(grid)
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a positive number, got {span!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    d1 = _direction_model(model, filter_normalized_direction(model, generator))
    d2 = _direction_model(model, filter_normalized_direction(model, generator))
    x = np.linspace(-span, span, nx)
    y = np.linspace(-span, span, ny)
    gx, gy = np.meshgrid(x, y)
    coefficients = np.stack([np.ones_like(gx), gx, gy], axis=-1).reshape(-1, 3)
    loss, error = _evaluate([model, d1, d2], coefficients, data, (nx, ny), loss_fn, bn_reset_data, batch_size, chunk,
                            progress)
    return LandscapeResult(x, y, loss, error, {"model": (0.0, 0.0)}, xlabel="direction 1", ylabel="direction 2")
