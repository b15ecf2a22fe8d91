"""The training loop researchers write: a DataLoader, ``torch.optim``, a Python step loop, and
``torch.nn.utils.prune`` masks re-applied to every pruned tensor after each step.

The hyperparameters are those of a ``fastmask.train.TrainConfig`` (read as plain fields): the
same optimizer, learning rate, warm-up and schedule, momentum, weight decay, batch size, number
of steps, augmentation, label smoothing, bf16 autocast and channels_last on CUDA.

Example::

    model = models.create("convnet3", 10, (3, 32, 32))
    outcome = train(model, images, labels, TrainConfig(epochs=5), seed=0, device=torch.device("cuda"),
                    test=(test_images, test_labels))
    print(outcome.test_accuracy)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.reference.data import autocast, eval_loader, evaluate, to_device, train_loader


@dataclasses.dataclass
class TrainOutcome:
    steps: int
    examples_seen: int  # steps x batch size: the "training points" a run consumed
    losses: list[float]
    test_loss: float | None = None
    test_accuracy: float | None = None


def total_steps(cfg, dataset_size: int) -> int:
    """``cfg.steps``, or ``cfg.epochs`` epochs of full batches (at least one batch per epoch)."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * max(1, dataset_size // min(cfg.batch_size, dataset_size))))


def lr_factor(cfg, step: int, total: int) -> float:
    """Linear warm-up over ``cfg.warmup_steps``, then constant, step (x gamma at each milestone
    fraction of the rest of the run) or cosine (to zero at the end)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {cfg.schedule!r}")


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def pruned_pairs(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(weight_orig, weight_mask) of every module ``torch.nn.utils.prune`` reparametrised."""
    return [(m.weight_orig, m.weight_mask) for m in model.modules() if hasattr(m, "weight_mask")]


def train(model: nn.Module, images: Tensor, labels: Tensor, cfg, seed: int, device: torch.device, *,
          test: tuple[Tensor, Tensor] | None = None, num_workers: int = 0, compile: bool = False) -> TrainOutcome:
    """Train ``model`` (already on ``device``) in place on the CPU tensors ``images`` / ``labels``.

    ``seed`` seeds the loader's shuffling and torch's global generator (the augmentation draws).
    With ``test`` the model is evaluated at the end; with ``compile`` the forward runs under
    ``torch.compile``.
    """
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    batch_size = min(cfg.batch_size, len(images))
    total = total_steps(cfg, len(images))
    torch.manual_seed(seed)
    pin = device.type == "cuda"
    loader = train_loader(images, labels, batch_size, seed, augment=cfg.augment, flip=cfg.flip,
                          num_workers=num_workers, pin_memory=pin)
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total))
    pairs = pruned_pairs(model)
    net = torch.compile(model) if compile else model
    losses = []
    model.train()
    batches = iter(loader)
    for _ in range(total):
        try:
            inputs, targets = next(batches)
        except StopIteration:  # a new epoch: a new shuffle
            batches = iter(loader)
            inputs, targets = next(batches)
        inputs, targets = to_device(inputs, targets, device)
        with autocast(device, cfg.amp):
            logits = net(inputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # weight decay and momentum would move the pruned entries of weight_orig
            for weight, mask in pairs:
                weight.mul_(mask)
        losses.append(loss.item())
    outcome = TrainOutcome(total, total * batch_size, losses)
    if test is not None:
        outcome.test_loss, outcome.test_accuracy = evaluate(net, eval_loader(*test, pin_memory=pin), device, cfg.amp)
    return outcome
