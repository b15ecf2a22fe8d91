"""A 2-D loss landscape the plain way: the plane through three weight sets (the orthonormal
coordinates of Garipov et al., as ``fastmask.landscape.plane``), one ``load_state_dict`` and one
DataLoader pass per grid point.

Example::

    result = plane(start, model_a, model_b, test_loader, grid=11, device=device)
    result["loss"]          # [grid][grid], result["loss"][i][j] at (x[j], y[i])
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from bench.reference.data import evaluate
from bench.reference.prune import copy_model


def effective_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters as the network uses them (``weight_orig`` times its prune mask), in order."""
    out = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            mask = getattr(module, name.removesuffix("_orig") + "_mask", None) if name.endswith("_orig") else None
            out.append(p.detach() if mask is None else p.detach() * mask)
    return out


def _dot(xs, ys) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def combined_state(states: list[dict[str, Tensor]], coefficients) -> dict[str, Tensor]:
    """sum_i c_i state_i over the floating tensors (prune masks and integer counters kept)."""
    first = states[0]
    return {k: sum(c * s[k] for c, s in zip(coefficients, states)) if v.is_floating_point() and not k.endswith("_mask")
            else v for k, v in first.items()}


def plane(w0: nn.Module, w1: nn.Module, w2: nn.Module, loader, grid: int, device: torch.device,
          margin: float = 0.2) -> dict:
    """Loss and error on a ``grid`` x ``grid`` plane through w0, w1, w2, one point at a time."""
    p0, p1, p2 = (effective_parameters(w) for w in (w0, w1, w2))
    u = [b - a for a, b in zip(p0, p1)]
    v = [b - a for a, b in zip(p0, p2)]
    u_norm, v_norm = math.sqrt(_dot(u, u)), math.sqrt(_dot(v, v))
    along = _dot(u, v) / u_norm
    across = math.sqrt(max(v_norm**2 - along**2, 0.0))
    points = {"w0": (0.0, 0.0), "w1": (u_norm, 0.0), "w2": (along, across)}
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    pad_x, pad_y = margin * (max(xs) - min(xs)), margin * (max(ys) - min(ys))
    x = np.linspace(min(xs) - pad_x, max(xs) + pad_x, grid)
    y = np.linspace(min(ys) - pad_y, max(ys) + pad_y, grid)
    states = [w.state_dict() for w in (w0, w1, w2)]
    net = copy_model(w0)
    loss, error = np.zeros((grid, grid)), np.zeros((grid, grid))
    for i, yi in enumerate(y):
        for j, xj in enumerate(x):
            c2 = yi / across
            c1 = xj / u_norm - c2 * along / u_norm
            net.load_state_dict(combined_state(states, (1 - c1 - c2, c1, c2)))
            loss[i, j], accuracy = evaluate(net, loader, device)
            error[i, j] = 1 - accuracy
    return {"x": x.tolist(), "y": y.tolist(), "loss": loss.tolist(), "error": error.tolist(),
            "points": {name: list(p) for name, p in points.items()}}
