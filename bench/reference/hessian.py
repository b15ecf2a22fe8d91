"""Hutchinson's estimate of the Hessian diagonal as PyHessian computes it: one Rademacher vector
at a time, a Hessian-vector product by double backward over every batch, a host sync per probe.

The Hessian is that of the mean loss over all batches, with respect to every trainable parameter,
the model in eval mode. For a model pruned with ``torch.nn.utils.prune`` the parameters are the
``weight_orig`` tensors: their pruned entries have a zero row and column in the Hessian, so they
add nothing to ``z . Hz``; the summaries (``diag_mean``, ``diag_max``) are over unpruned entries.

Example::

    summary = hutchinson(model, batches, num_probes=64, seed=0)
    summary["trace"], summary["trace_stderr"]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _named_masks(model: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    masks = {}
    for name in params:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        mask = getattr(module, leaf.removesuffix("_orig") + "_mask", None) if leaf.endswith("_orig") else None
        masks[name] = torch.ones_like(params[name], dtype=torch.bool) if mask is None else mask != 0
    return masks


def hessian_vector_product(model: nn.Module, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                           vector: list[Tensor], device: torch.device, cached_grads=None) -> list[Tensor]:
    """H v of the mean loss over ``batches`` by double backward: through ``cached_grads`` (the
    gradient, with its graph, of a single batch), or batch by batch with the gradient recomputed
    each time, as PyHessian's data-loader path does."""
    if cached_grads is not None:
        return list(torch.autograd.grad(cached_grads, params, grad_outputs=vector, retain_graph=True))
    count = sum(len(targets) for _, targets in batches)
    total = [torch.zeros_like(p) for p in params]
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        loss = F.cross_entropy(model(inputs), targets) * (len(targets) / count)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for t, hv in zip(total, torch.autograd.grad(grads, params, grad_outputs=vector)):
            t.add_(hv)
    return total


def hutchinson(model: nn.Module, batches: list[tuple[Tensor, Tensor]], num_probes: int, seed: int,
               device: torch.device) -> dict:
    """``{"trace", "trace_stderr", "diag_mean", "diag_max", "num_probes"}`` from ``num_probes`` probes."""
    was_training = model.training
    model.eval()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    masks = list(_named_masks(model, named).values())
    cached_grads = None
    if len(batches) == 1:  # PyHessian keeps the gradient's graph of a single batch for every probe
        inputs, targets = (t.to(device) for t in batches[0])
        cached_grads = torch.autograd.grad(F.cross_entropy(model(inputs), targets), params, create_graph=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    diag = [torch.zeros_like(p) for p in params]
    traces = []
    for _ in range(num_probes):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=device).to(p.dtype) * 2 - 1 for p in params]
        hv = hessian_vector_product(model, params, batches, v, device, cached_grads)
        products = [vi * hvi for vi, hvi in zip(v, hv)]
        for d, product in zip(diag, products):
            d.add_(product)
        traces.append(sum(product.sum() for product in products).item())
    model.train(was_training)
    kept = torch.cat([(d / num_probes)[m] for d, m in zip(diag, masks)])
    mean_trace = sum(traces) / num_probes
    variance = sum((t - mean_trace) ** 2 for t in traces) / (num_probes - 1)
    return {"trace": mean_trace, "trace_stderr": math.sqrt(variance / num_probes), "diag_mean": kept.mean().item(),
            "diag_max": kept.max().item(), "num_probes": num_probes}
