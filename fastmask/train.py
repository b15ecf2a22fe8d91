"""The training engine: one ``fit`` for a model or a stack of K models, resumable.

``fit`` trains with the fused masked optimizers (pruned weights stay exactly zero), a warm-up
then a constant, step or cosine schedule, device-resident batches from ``fastmask.data.Loader``
(each model of a stack with its own data order and augmentation), bf16 autocast and
channels_last on CUDA, the forward and backward pass of each step replayed from a CUDA graph on
CUDA (``TrainConfig.cuda_graph``), checkpoints at named steps (rewind points), and a ``Checkpoint``
of its training state (``fastmask.checkpoint.CheckpointFile`` in a run folder) that a rerun
resumes from, reaching exactly the uninterrupted run's weights. A stack trains as its K models one
after another, which measured faster on the CPU and on an H200, or as one stacked pass per step
(``fit``'s ``one_at_a_time``; the same weights up to float rounding). ``evaluate`` gives the test loss and
accuracy of a model or of each model of a stack (``fastmask.evaluation``'s batch loop).

Under torchrun (``fastmask.distributed.active()``) ``fit`` is data parallel: every process holds
the dataset on its device, draws the global batch of each step (the Loader's batch is a pure
function of the seed and the step) and keeps a contiguous slice of its rows; the model is
wrapped in ``DistributedDataParallel``, so the gradient is that of the global batch's mean loss,
as in one process, up to the order of the float sums. BatchNorm normalises each process's slice
(no SyncBatchNorm); its running statistics are averaged over the processes at every save and
checkpoint and at the end, so that every process holds the same model. Every rank hands its
state to the ``Checkpoint``; ``CheckpointFile`` writes rank 0's and gives every rank what rank 0 sees.

Example::

    splits = fastmask.data.load("digits")
    model = fastmask.models.create("convnet3", 10, splits.train.image_shape)
    result = fit(model, splits.train, TrainConfig(epochs=15, lr=0.01), seed=0, eval_data=splits.test)
    print(result.metrics["test_accuracy"])
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import statistics
import warnings
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastmask import distributed, evaluation
from fastmask.data import Dataset, Loader
from fastmask.optim import MaskedAdamW, MaskedSGD
from fastmask.stack import Stack


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of one training run (defaults: the distillation literature's evaluation,
    batch 256 and lr 0.01, made for CIFAR-sized sets; on digits, batch 64 and lr 0.05 train
    ConvNet-3 to about 97% in 10 epochs).

    Example::

        cfg = TrainConfig(epochs=10, batch_size=64, lr=0.05)              # augment: None, chosen by the data
        cifar = TrainConfig(epochs=60, schedule="step", milestones=(0.5, 0.75), augment=True)
        cfg.total_steps(1437)                                             # 220 steps on digits' training set
    """

    optimizer: str = "sgd"  # "sgd" (MaskedSGD) or "adamw" (MaskedAdamW)
    lr: float = 0.01  # the peak learning rate, reached after warmup_steps
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 5e-4  # SGD: L2 added to the gradient; AdamW: decoupled
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    batch_size: int = 256  # examples per step and model (capped at the dataset's size); the global batch under torchrun
    epochs: float = 10.0  # passes over the data (fractions allowed); ignored when steps is set
    steps: int | None = None  # optimizer steps, instead of epochs
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # "constant", "step" (lr x gamma at each milestone) or "cosine" (to 0)
    milestones: tuple[float, ...] = (0.5,)  # fractions of the run, for "step"
    gamma: float = 0.1  # the factor at each milestone, for "step"
    # Random crop (pad 4) and horizontal flip. None: chosen by the data (``augments``): on for colour
    # images of at least 32 x 32 (CIFAR, ImageNet-like), off for grey or smaller ones (digits, MNIST,
    # Fashion-MNIST), where a 4-pixel shift or a mirror image changes or destroys the class.
    augment: bool | None = None
    flip: bool = True  # with augment: also mirror images left-right
    label_smoothing: float = 0.0  # of the cross-entropy's targets
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    cuda_graph: bool = True  # on CUDA in one process: replay each step's forward and backward from a CUDA graph

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "step", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    def augments(self, image_shape: Sequence[int]) -> bool:
        """Whether training on images of ``image_shape`` ``[C, H, W]`` augments (``augment``, or its rule)."""
        if self.augment is not None:
            return self.augment
        channels, height, width = image_shape
        return channels == 3 and min(height, width) >= 32

    def total_steps(self, dataset_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * max(1, dataset_size // min(self.batch_size, dataset_size))))

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of ``lr`` at ``step``: linear warm-up, then the schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.gamma ** sum(progress >= m for m in self.milestones)
        return 1.0


@dataclasses.dataclass
class TrainResult:
    """What ``fit`` returns: per-step losses, rewind checkpoints and final metrics."""

    steps: int
    losses: list[float]  # mean training loss over models, every step
    checkpoints: dict[int, dict[str, Tensor]]  # step -> state_dict, for the steps asked for
    metrics: dict[str, float | list[float]]
    examples_seen: int  # training examples consumed per model (the "training points" of a run)

    def __repr__(self) -> str:  # the metrics, never the checkpoints' tensors
        def short(value):
            if isinstance(value, (list, tuple)):
                return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
            return f"{value:.4g}" if isinstance(value, float) else repr(value)
        metrics = ", ".join(f"{k}={short(v)}" for k, v in self.metrics.items())
        last = f", last loss {self.losses[-1]:.4g}" if self.losses else ""
        return (f"TrainResult({self.steps} steps, {self.examples_seen} examples seen{last}, "
                f"checkpoints at {sorted(self.checkpoints)}, {metrics})")


# DDP would broadcast every buffer (the masks too) at each step; fit averages the running statistics
# at saves, checkpoints and the end instead. torch 2.13 renamed the option (the old name still works, with a warning).
_NO_BUFFER_BROADCAST = ({"forward_sync_buffers": False}
                        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                        else {"broadcast_buffers": False})


# Devices on which ``fit`` trains the models of a Stack one after another (each as the plain
# model it is), not as one stacked network. Measured on a 2-core CPU (1 torch thread, ConvNet-3
# width 128, batch 64, the stacked pass against the loop in one process): two models as a stack of
# 2 took about 1.2x the time of two plain fits on 8x8 digits and 1.5-2x on 28x28 images; the
# stacked backward pass spends the difference copying and re-laying out the grouped conv's
# [N, K*O, H, W] output for the per-model norms and ReLUs, where one model's conv writes in place.
# On an H200 (bench_train's two-model case: ConvNet-3 width 128, 100 steps of batch 256 on 32x32
# images, bf16, CUDA graphs) the stacked pass took 0.88-0.89x the speed of two plain fits and one
# at a time 0.98x: cuDNN's grouped convolution (or K convolutions and a copy) lose to K plain ones.
STACK_ONE_AT_A_TIME_DEVICES = ("cpu", "cuda")


def make_optimizer(model: nn.Module, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return MaskedSGD.from_model(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.nesterov)
    return MaskedAdamW.from_model(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, cfg: TrainConfig):
    # No cast cache: a graph-captured step must recast the weights it replays with (torch's graph
    # capture asks for cache_enabled=False); fastmask's masked layers cast their weights themselves.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda",
                          cache_enabled=False)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put the 4-d weights (convolutions) of ``model`` in channels_last memory order, in place.

    ``nn.Module.to(memory_format=...)`` would refuse the 5-d ``[K, O, C, R, S]`` weights of a
    ``Stack``: those keep their layout (the stacked kernels address any strides).
    """
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


def images_channels_last(images: Tensor) -> Tensor:
    """A batch ``[B, C, H, W]`` (or a stack's ``[K, B, C, H, W]``, per model) in channels_last order.

    A convolution's output takes its input's layout, so this one conversion makes every later
    activation channels_last, the order in which the conv kernels read channels contiguously.
    """
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    if images.dim() == 5:
        return images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return images


def _rows(batch: Tensor, rows: slice, stacked: bool) -> Tensor:
    """This process's slice of a global batch (dimension 1 of a stack's ``[K, B, ...]``)."""
    return batch[:, rows].contiguous() if stacked else batch[rows]


def _loss(logits: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    """Mean cross-entropy per model, summed over the models of a stack (so each model's
    gradient is that of its own mean loss)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    per_example = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), label_smoothing=label_smoothing,
                                  reduction="none")
    return per_example.view(targets.shape).mean(1).sum()


class _CapturedStep:
    """The forward pass, loss and backward pass of a training step as one CUDA graph, replayed.

    A step of a small network is a few hundred kernel launches, whose CPU cost from Python can
    exceed their GPU time; the replay of a graph launches them all at once. The Loader
    gathers and augments each batch outside the graph (its draws are made on the CPU) and the
    batch is copied into the graph's static input; the captured backward writes the gradients into
    the same tensors at every replay; the fused optimizer's step (one launch, with the learning rate
    of the step from its param group) runs after the replay, outside the graph.

    The first ``WARMUP`` calls run eagerly on a side stream, as torch's graph capture asks: Triton
    autotuning, the per-shape Triton-vs-cuDNN choice (fastmask.ops) and cuDNN's setup happen there,
    never inside the capture. The call that captures then replays, so every step is computed once,
    by the kernels an eager step runs. If the capture fails, a warning says why and the steps run
    eagerly from then on (a failed capture has executed nothing, so no step is lost or repeated).
    """

    WARMUP = 3

    def __init__(self, forward_backward: Callable[[Tensor, Tensor], Tensor], zero_grad: Callable[[], None]):
        self.forward_backward = forward_backward
        self.zero_grad = zero_grad
        self.eager_calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.side_stream = torch.cuda.Stream()

    def __call__(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The step's loss (detached, on the device); the gradients are left in the parameters' ``.grad``."""
        if self.graph is None and (self.failed or self.eager_calls < self.WARMUP):
            self.eager_calls += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                self.zero_grad()
                loss = self.forward_backward(inputs, targets)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return loss
        if self.graph is None:
            self.inputs, self.targets = inputs.clone(), targets.clone()
            self.zero_grad()  # so the captured backward allocates the gradients in the graph's memory pool
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    self.loss = self.forward_backward(self.inputs, self.targets)
            except RuntimeError as error:
                torch.cuda.set_stream(stream)  # torch.cuda.graph leaves its capture stream current when capture_end fails
                warnings.warn(f"capturing the training step in a CUDA graph failed, training on without one: {error}",
                              RuntimeWarning, stacklevel=3)
                self.failed = True
                return self(inputs, targets)
            self.graph = graph
        else:
            self.inputs.copy_(inputs)
            self.targets.copy_(targets)
        self.graph.replay()
        return self.loss.clone()


class Checkpoint(Protocol):
    """Where ``fit`` keeps its training state for a rerun (``fastmask.checkpoint.CheckpointFile``).

    ``load(device)`` gives the state saved last, or None; ``save(state)`` keeps ``state`` (weights,
    optimizer, step, losses, rewind checkpoints), which ``fit`` hands over every ``every`` steps
    (0: never) and at the end.
    """

    every: int

    def load(self, device: torch.device) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int | Sequence[int] = 0, *,
        checkpoint_steps: Sequence[int] = (), checkpoint: Checkpoint | None = None, eval_data: Dataset | None = None,
        progress: bool = True, description: str = "train", one_at_a_time: bool | None = None) -> TrainResult:
    """Train ``model`` (or a ``Stack``) on ``data`` in place; returns a ``TrainResult``.

    Args:
        seed: the data order and augmentation seed; a sequence of K seeds for a stack of K.
        checkpoint_steps: steps whose weights are returned in ``result.checkpoints`` (0 = before
            the first update): the rewind points of IMP.
        checkpoint: where the training state is saved every ``checkpoint.every`` steps and at the
            end; if it holds a state, training resumes from it.
        eval_data: evaluated at the end (``test_loss``, ``test_accuracy``; lists for a stack).
        one_at_a_time: for a Stack, train its models one after another, each as a plain model
            with its own seed, and load the results back into the stack: the same weights as the
            stacked pass up to float rounding (bit for bit those of K plain ``fit`` calls; a model
            with dropout draws other dropout masks on the two paths, so it differs more). None:
            on the devices of ``STACK_ONE_AT_A_TIME_DEVICES`` (the CPU and CUDA), where it is faster.
            A ``checkpoint`` that holds a state resumes on the path that saved it, whatever this says.

    Data parallel when ``fastmask.distributed.active()`` (see the module docstring): call it on
    every rank with the same arguments; the batch size is the global one.

    Example::

        splits = fastmask.data.load("digits")
        stack = Stack([models.create("convnet3", 10, (1, 8, 8)) for _ in range(4)])
        result = fit(stack, splits.train, TrainConfig(epochs=10, batch_size=64, lr=0.05), seed=[0, 1, 2, 3],
                     eval_data=splits.test)
        result.metrics["test_accuracy"]          # four accuracies, about 0.97 each
    """
    stacked = isinstance(model, Stack)
    seeds = list(seed) if stacked else seed
    if stacked and len(seeds) != model.num_models:
        raise ValueError(f"seed must hold one seed per model ({model.num_models}), got {len(seeds)}")
    if not stacked and not isinstance(seed, int):
        raise TypeError("seed must be an int for a single model (a sequence is for a Stack)")
    device = next(model.parameters()).device
    if data.device != device:
        raise ValueError(f"data is on {data.device} but the model is on {device}")
    state = checkpoint.load(device) if checkpoint is not None else None
    if one_at_a_time is None:
        one_at_a_time = device.type in STACK_ONE_AT_A_TIME_DEVICES
    # A state saved by the other path (the device rule changed between runs) resumes on its own path.
    if stacked and (state is None and one_at_a_time or state is not None and "finished" in state):
        return _fit_one_at_a_time(model, data, cfg, seeds, state, checkpoint_steps=checkpoint_steps,
                                  checkpoint=checkpoint, eval_data=eval_data, progress=progress,
                                  description=description)
    channels_last = device.type == "cuda" and cfg.channels_last
    if channels_last:
        to_channels_last(model)
    batch_size = min(cfg.batch_size, len(data))
    loader = Loader(data, batch_size, seeds, augment=cfg.augments(data.image_shape), flip=cfg.flip)
    total = cfg.total_steps(len(data))
    parallel = distributed.active()
    world, rank = distributed.world_size() if parallel else 1, distributed.rank() if parallel else 0
    if batch_size < world:
        raise ValueError(f"batch_size {batch_size} is smaller than the {world} data-parallel processes")
    rows = slice(batch_size * rank // world, batch_size * (rank + 1) // world)
    # The slice's mean loss times its share of the batch is its part of the global mean loss;
    # DDP averages the gradients over the processes, so the backward pass multiplies by world too.
    share = (rows.stop - rows.start) / batch_size
    optimizer = make_optimizer(model, cfg)
    wanted = set(checkpoint_steps)
    checkpoints: dict[int, dict[str, Tensor]] = {}
    losses: list[float] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, checkpoints = state["step"], state["losses"], state["checkpoints"]
    network = model
    if parallel:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_BUFFER_BROADCAST)

    pending: list[Tensor] = []  # this run's step losses, on the device: no host sync per step

    def flush():
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    def save(step: int):
        flush()
        checkpoint.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "losses": losses, "checkpoints": checkpoints})

    def snapshot(step: int):
        if step in wanted:
            distributed.average_tensors(model.buffers())  # every rank keeps the same checkpoint
            checkpoints[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def forward_backward(inputs: Tensor, targets: Tensor) -> Tensor:
        with _autocast(device, cfg):
            logits = network(inputs)
        loss = _loss(logits, targets, cfg.label_smoothing)
        if not parallel:
            loss.backward()
            return loss.detach()
        (loss * (share * world)).backward()
        loss = loss.detach() * share
        torch.distributed.all_reduce(loss)  # the global batch's mean loss
        return loss

    def zero_grad():
        optimizer.zero_grad(set_to_none=True)

    # DDP's gradient hooks are not captured: data-parallel steps run eagerly.
    captured = cfg.cuda_graph and device.type == "cuda" and not parallel
    step_fn = _CapturedStep(forward_backward, zero_grad) if captured else None
    model.train()
    if start == 0:
        snapshot(0)
    bar = tqdm(range(start, total), desc=description, disable=not progress or not distributed.is_main(), leave=False,
               initial=start, total=total)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_factor(step, total)
        inputs, targets = loader.batch(step)
        if parallel:
            inputs, targets = _rows(inputs, rows, stacked), _rows(targets, rows, stacked)
        if channels_last:
            inputs = images_channels_last(inputs)
        if step_fn is not None:
            loss = step_fn(inputs, targets)
        else:
            zero_grad()
            loss = forward_backward(inputs, targets)
        optimizer.step()
        pending.append(loss.detach() / (model.num_models if stacked else 1))
        snapshot(step + 1)
        if checkpoint is not None and checkpoint.every and (step + 1) % checkpoint.every == 0 and step + 1 < total:
            distributed.average_tensors(model.buffers())  # every rank resumes from the same statistics
            save(step + 1)
        if progress and (step % 50 == 0 or step + 1 == total):
            bar.set_postfix(loss=f"{pending[-1].item() if pending else losses[-1]:.3f}")
    flush()
    if start < total:
        distributed.average_tensors(model.buffers())
    if checkpoint is not None:
        save(total)
    return TrainResult(total, losses, checkpoints, _test_metrics(model, eval_data, cfg),
                       examples_seen=total * batch_size)


def _test_metrics(model: nn.Module, eval_data: Dataset | None, cfg: TrainConfig) -> dict:
    if eval_data is None:
        return {}
    loss, accuracy = evaluate(model, eval_data, amp=cfg.amp)
    return {"test_loss": loss, "test_accuracy": accuracy}


class _ModelOfStack:
    """The ``Checkpoint`` of one model of a stack trained one at a time: its state goes into the
    stack's one state, ``{"finished": [each trained model's weights, losses, checkpoints],
    "current": this model's training state}``, so a rerun resumes inside the model it stopped in."""

    def __init__(self, stack_checkpoint: Checkpoint, finished: list[dict], current: dict | None):
        self.stack_checkpoint, self.finished, self.current = stack_checkpoint, finished, current
        self.every = stack_checkpoint.every

    def load(self, device: torch.device) -> dict | None:
        return self.current

    def save(self, state: dict) -> None:
        self.stack_checkpoint.save({"finished": list(self.finished), "current": state})


def _stacked_state(template: nn.Module, states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The state_dict of the Stack of ``template``-shaped models holding ``states``."""
    models = []
    for state in states:
        model = copy.deepcopy(template)
        model.load_state_dict(state)
        models.append(model)
    return Stack(models).state_dict()


def _fit_one_at_a_time(stack: Stack, data: Dataset, cfg: TrainConfig, seeds: Sequence[int], state: dict | None, *,
                       checkpoint_steps: Sequence[int], checkpoint: Checkpoint | None, eval_data: Dataset | None,
                       progress: bool, description: str) -> TrainResult:
    """``fit`` of a Stack as its K models one after another (``fit``'s ``one_at_a_time``)."""
    finished = list(state["finished"]) if state is not None else []
    models = stack.split()
    result = None
    for k in range(len(finished), stack.num_models):
        resumed = state["current"] if state is not None and k == len(state["finished"]) else None
        result = fit(models[k], data, cfg, seeds[k], checkpoint_steps=checkpoint_steps,
                     checkpoint=_ModelOfStack(checkpoint, finished, resumed) if checkpoint is not None else None,
                     progress=progress, description=f"{description} {k + 1}/{stack.num_models}")
        finished.append({"model": models[k].state_dict(), "losses": result.losses, "checkpoints": result.checkpoints})
    if checkpoint is not None and result is not None:
        checkpoint.save({"finished": finished})
    stack.load_state_dict(_stacked_state(models[0], [done["model"] for done in finished]))
    stack.train()
    losses = [statistics.fmean(step) for step in zip(*(done["losses"] for done in finished))]
    checkpoints = {step: _stacked_state(models[0], [done["checkpoints"][step] for done in finished])
                   for step in sorted(finished[0]["checkpoints"])}
    total = cfg.total_steps(len(data))
    return TrainResult(total, losses, checkpoints, _test_metrics(stack, eval_data, cfg),
                       examples_seen=total * min(cfg.batch_size, len(data)))


def training_footprint(model: nn.Module, data: Dataset, cfg: TrainConfig) -> int:
    """Bytes of CUDA memory one training step of ``model`` (a plain model) takes at its peak: its
    weights, the gradients and activations of a forward and backward pass of one batch (measured,
    on a throwaway copy), and the optimizer's state (one tensor per parameter for SGD with
    momentum, two for AdamW). What a stack of K such models needs is about K times this.

    Example::

        per_model = training_footprint(model, splits.train, cfg)
        fitting = int(0.6 * torch.cuda.mem_get_info()[0] // per_model)
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"model must be on a CUDA device to measure its footprint, got {device}")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    trial = copy.deepcopy(model).train()
    if cfg.channels_last:
        to_channels_last(trial)
    batch = min(cfg.batch_size, len(data))
    inputs, targets = data.images[:batch], data.labels[:batch]
    with _autocast(device, cfg):
        logits = trial(images_channels_last(inputs) if cfg.channels_last else inputs)
    _loss(logits, targets, cfg.label_smoothing).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del trial, logits
    states = (0 if cfg.optimizer == "sgd" and cfg.momentum == 0 else 1) + (cfg.optimizer == "adamw")
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, peak + states * parameter_bytes)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int | None = None, amp: bool = True):
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (lists of K values for a Stack),
    in batches of ``batch_size`` (None: ``evaluation.default_batch_size``, 128 on the CPU).

    The model is evaluated in eval mode (bf16 autocast on CUDA with ``amp``) and put back in the
    mode it was in. The loss is summed in float32, as it always was here (``fastmask.lmc`` sums in
    float64).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    networks, _ = evaluation.forward_of(model)

    def forward(inputs: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            return networks(inputs).float()

    total_loss = total_correct = 0
    for logits, targets in evaluation.outputs(forward, evaluation.Batches(data, device, batch_size)):
        loss, correct = evaluation.batch_sums(logits, targets)
        total_loss = total_loss + loss
        total_correct = total_correct + correct
    model.train(was_training)
    loss = (total_loss / len(data)).tolist()
    accuracy = (total_correct.double() / len(data)).tolist()
    return (loss, accuracy) if isinstance(model, Stack) else (loss[0], accuracy[0])
