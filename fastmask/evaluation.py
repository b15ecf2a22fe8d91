"""K networks over data: the one batch loop of fastmask's evaluations.

Every evaluation in fastmask is "run K networks (a ``Stack``, one model, or the K combinations of
``fastmask.combinations``) over batches of data and reduce": ``train.evaluate`` (loss and
accuracy), ``prune.el2n_scores`` (per-example scores), ``lmc`` and ``landscape`` (loss and error
of every network on a line or a plane) and ``hessian`` (whose batch loop takes Hessian-vector
products rather than a forward). They share these pieces:

- ``Batches(data, device)``: a fastmask ``Dataset`` cut into batches, or any iterable of
  ``(inputs, targets)`` pairs, as a re-iterable of pairs on ``device`` (a one-shot iterator is
  kept as a list, since several passes may be needed), each batch checked as it comes;
- ``forward_of(model)``: the logits ``[K, B, ...]`` of a model's K networks on one shared batch;
- ``outputs(forward, batches)``: those logits batch by batch, without gradients;
- ``batch_sums(logits, targets)``: a batch's summed loss and correct predictions per network;
- ``loss_and_error(forward, K, batches)``: mean loss and error (1 - accuracy) over all examples.

Example::

    from fastmask import evaluation
    forward, K = evaluation.forward_of(stack)
    loss, error = evaluation.loss_and_error(forward, K, evaluation.Batches(splits.test, device))
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask.data import Dataset, DataSplits
from fastmask.stack import Stack

__all__ = ["Batches", "LossFn", "DEFAULT_BATCH_SIZE", "CPU_BATCH_SIZE", "default_batch_size", "forward_of", "outputs",
           "batch_sums", "loss_and_error"]

DEFAULT_BATCH_SIZE = 1024  # examples per batch when data is a fastmask Dataset (on a GPU)
# On the CPU: smaller batches evaluate faster. Measured on the 2-core CPU machine (2 torch threads,
# `train.evaluate`, best of 3, batch 1024 time over batch 128 time): ConvNet-3 width 128 on 2,000
# 28 x 28 images 2.22x, on 1,000 32 x 32 images 2.61x; ResNet-10 width 16 at 28 x 28 1.38x,
# ResNet-18 width 16 at 32 x 32 1.40x; digits' 360 test images 0.97x (14 against 15 ms). Batch 64
# was no faster than 128 but at 32 x 32 with ResNet-18; 256 lost 1.2-1.3x against 128 at 28 x 28.
CPU_BATCH_SIZE = 128

LossFn = Callable[[Tensor, Tensor], Tensor]


def default_batch_size(device: torch.device) -> int:
    """Examples per evaluation batch of a fastmask Dataset on ``device``: ``CPU_BATCH_SIZE`` on the
    CPU, ``DEFAULT_BATCH_SIZE`` elsewhere. The batch size changes only the order of the float sums.

    Example::

        default_batch_size(torch.device("cpu"))     # 128
    """
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else DEFAULT_BATCH_SIZE


class Batches:
    """``data`` as a re-iterable of (inputs, targets) on ``device``: a fastmask Dataset (cut into
    ``batch_size`` batches; None: ``default_batch_size(device)``), or any iterable of pairs (a
    one-shot iterator is kept as a list).

    With ``class_targets`` (the default) every batch must hold integer class targets ``[B]`` for
    inputs ``[B, ...]``; without, targets may be anything (tensors among them are moved too).
    Errors name the data ``name``. Empty data is a ValueError.
    """

    def __init__(self, data, device: torch.device, batch_size: Optional[int] = None, name: str = "data", *,
                 class_targets: bool = True):
        if data is None:
            raise TypeError(f"{name} is required: an iterable of (inputs, targets) batches or a fastmask Dataset")
        if isinstance(data, DataSplits):
            raise TypeError(f"{name} must be one Dataset (e.g. splits.test), not DataSplits")
        if not isinstance(data, Dataset):
            try:
                iterator = iter(data)
            except TypeError:
                raise TypeError(f"{name} must be an iterable of (inputs, targets) batches or a fastmask Dataset, "
                                f"got {type(data).__name__}") from None
            if iterator is data:
                data = list(data)
        if batch_size is None:
            batch_size = default_batch_size(device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.device, self.batch_size, self.name = data, device, batch_size, name
        self.class_targets = class_targets
        if self.first() is None:
            raise ValueError(f"{name} holds no examples")

    def __iter__(self) -> Iterator[tuple[Tensor, object]]:
        if isinstance(self.data, Dataset):
            for start in range(0, len(self.data), self.batch_size):
                yield (self.data.images[start:start + self.batch_size].to(self.device),
                       self.data.labels[start:start + self.batch_size].to(self.device))
            return
        for i, batch in enumerate(self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)
                    and (isinstance(batch[1], Tensor) or not self.class_targets)):
                raise TypeError(f"{self.name}: batch {i} must be a pair (inputs, targets) of tensors, "
                                f"got {type(batch).__name__}")
            inputs, targets = batch
            if self.class_targets and (targets.dim() != 1 or targets.shape[0] != inputs.shape[0]
                                       or targets.is_floating_point()):
                raise ValueError(f"{self.name}: batch {i} must have integer class targets [B] for inputs [B, ...], "
                                 f"got targets {targets.dtype} {tuple(targets.shape)}, inputs {tuple(inputs.shape)}")
            yield inputs.to(self.device), targets.to(self.device) if isinstance(targets, Tensor) else targets

    def first(self) -> Optional[tuple[Tensor, object]]:
        return next(iter(self), None)


def forward_of(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], int]:
    """``(forward, K)``: ``forward(x)`` gives the logits ``[K, B, ...]`` of ``model``'s K networks on
    one batch ``x`` ``[B, ...]`` that all of them see: a ``Stack``'s K models, or a model alone (K = 1)."""
    if isinstance(model, Stack):
        return (lambda x: model(x, shared=True)), model.num_models
    return (lambda x: model(x).unsqueeze(0)), 1


@torch.no_grad()
def outputs(forward: Callable[[Tensor], Tensor], batches: Batches) -> Iterator[tuple[Tensor, object]]:
    """``(forward(inputs), targets)`` for every batch, computed without gradients."""
    for inputs, targets in batches:
        yield forward(inputs), targets


def batch_sums(logits: Tensor, targets: Tensor, loss_fn: Optional[LossFn] = None) -> tuple[Tensor, Tensor]:
    """The summed loss ``[K]`` and the number of correct predictions ``[K]`` of K networks' logits
    ``[K, B, classes]`` on one batch (float64 logits stay float64, others are computed in float32).
    ``loss_fn(logits [B, classes], targets [B])`` gives a batch's mean loss; cross-entropy by default."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    K, B = logits.shape[0], targets.shape[0]
    if loss_fn is None:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.repeat(K), reduction="none").view(K, B).sum(1)
    else:
        loss = torch.stack([torch.as_tensor(loss_fn(logits[k], targets)) for k in range(K)]) * B
    return loss, (logits.argmax(-1) == targets).sum(1)


def loss_and_error(forward: Callable[[Tensor], Tensor], K: int, batches: Batches,
                   loss_fn: Optional[LossFn] = None) -> tuple[list[float], list[float]]:
    """Mean loss and error (1 - accuracy) over all examples of the K networks of ``forward``
    (logits ``[K, B, classes]``), the sums kept in float64."""
    loss_sum = correct = None
    count = 0
    for logits, targets in outputs(forward, batches):
        batch_loss, hits = batch_sums(logits, targets, loss_fn)
        loss_sum = batch_loss.double() if loss_sum is None else loss_sum + batch_loss.double()
        correct = hits if correct is None else correct + hits
        count += targets.shape[0]
    return (loss_sum / count).tolist(), (1 - correct.double() / count).tolist()
