"""Linear mode connectivity the way it is usually written: one network, ``load_state_dict`` of
the interpolated state per alpha, a DataLoader pass per alpha (after a REPAIR-style BatchNorm
reset pass when asked), ``.item()`` per batch.

Every floating tensor of the state (weights, biases, norm parameters, BatchNorm running
statistics) is interpolated; ``torch.nn.utils.prune``'s masks are kept.

Example::

    losses, errors = curve(model_a, model_b, alphas, test_loader, device)
    barrier(alphas, errors)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.reference.data import evaluate
from bench.reference.prune import copy_model


def alpha_grid(count: int) -> list[float]:
    """``count`` evenly spaced alphas from 0 to 1, both included (Frankle et al. use 30)."""
    if count < 2:
        raise ValueError(f"alphas must be >= 2 (the endpoints), got {count}")
    return [i / (count - 1) for i in range(count)]


def interpolated_state(state_a: dict[str, Tensor], state_b: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    return {k: (1 - alpha) * a + alpha * state_b[k] if a.is_floating_point() and not k.endswith("_mask") else a
            for k, a in state_a.items()}


def reset_batch_norm(net: nn.Module, loader, device: torch.device) -> None:
    """REPAIR: reset every BatchNorm's statistics and recompute them (cumulative average,
    momentum None) in one train-mode pass without gradient."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        for inputs, _ in loader:
            net(inputs.to(device, non_blocking=True))
    net.eval()


def curve(model_a: nn.Module, model_b: nn.Module, alphas: list[float], loader, device: torch.device,
          reset_loader=None) -> tuple[list[float], list[float]]:
    """Loss and error of ``(1 - alpha) a + alpha b`` at every alpha, one alpha at a time."""
    net = copy_model(model_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    losses, errors = [], []
    for alpha in alphas:
        net.load_state_dict(interpolated_state(state_a, state_b, alpha))
        if reset_loader is not None:
            reset_batch_norm(net, reset_loader, device)
        loss, accuracy = evaluate(net, loader, device)
        losses.append(loss)
        errors.append(1 - accuracy)
    return losses, errors


def barrier(alphas: list[float], values: list[float]) -> float:
    """max over alpha of value(alpha) minus the mean of the values at alpha 0 and 1."""
    return max(values) - (values[alphas.index(0.0)] + values[alphas.index(1.0)]) / 2
