"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., 2022).

Experts. ``ExpertBuffer`` trains networks on the real data (SGD without momentum or weight
decay, lr 0.01, batch 256, DSA augmentation with an independent draw per image, 50 epochs: MTT's
``buffer.py``) and keeps each one's trajectory: its parameters flattened into one vector ``[P]``
at the start and after every epoch, ``[epochs + 1, P]``. With a folder, each expert is one
safetensors file there (``expert_0000.safetensors``, ...; tensor ``"trajectory"``, and under the
metadata key ``"fastmask.expert"`` the training recipe and the parameter layout); a later run
with the same recipe reuses the files it finds and trains only the missing experts, and a file
made with another recipe is an error rather than silently mixed in. The experts of one call
train as one stack of up to ``parallel`` networks (``fastmask.stack``), each with its own
initialisation, data order and augmentation.

Distillation. Each iteration, for each of K students (``num_networks``; MTT uses 1), draws an
expert and a start epoch t in [0, ``max_start_epoch``), starts from the expert's parameters at t
and takes N = ``syn_steps`` SGD steps on batches of the synthetic images (``batch_syn`` of them,
all by default; DSA with an independent draw per image), with one learnable learning rate:

    theta_{i+1} = theta_i - lr * grad CE(theta_i; augmented synthetic batch i)

then compares with the expert M = ``expert_epochs`` epochs later:

    loss = || theta_N - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2

(averaged over the K students) and backpropagates through the whole unroll to the images and the
learning rate (SGD, momentum 0.5 each; lr ``lr`` for the images, ``lr_lr`` for the rate). The
rate is a raw scalar as in MTT's code (``syn_lr``, started at ``lr_teacher``), not
log-parametrised; its final value is recorded as ``hyperparameters["learned_lr"]`` (MTT
evaluates its sets with it).

The student runs functionally: the stacked model (``fastmask.stack``) is called with
``torch.func.functional_call`` on views of the flat parameter vectors ``[K, P]``, so K students
run in one forward per step. Memory: the unroll keeps all N steps' graphs (forward activations
and the double-backward graph of each step) until the final backward, so it grows as
N x K x batch_syn. For CIFAR-shaped data, ConvNet-3 (width 128), 100 synthetic images per step,
N = 30 and K = 1, the tensors autograd saves come to 14.2 GiB (measured on the CPU with saved-tensor
hooks, the torch reference path: 483 MiB per step), and K students take K times that; the GPU
peak, backward temporaries included, is what ``bench/bench_distill_ii.py`` measures.

Defaults are ``shared/reference.md``'s CIFAR-10 IPC 10 settings: N = 30, M = 2, max start epoch
20, lr 100 (ZCA space), lr_lr 1e-5, lr_teacher 1e-3, 5000 iterations; 100 experts of 50 epochs.
Use a ConvNet without BatchNorm (the default ConvNet-3 has instance norm), as the papers do.

Example::

    from fastmask.distill import distill
    syn = distill("mtt", splits.train, images_per_class=10, buffer="run/experts")   # trains, or reuses, the experts
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from fastmask import io, models
from fastmask.data import Dataset
from fastmask.distill.augment import DSA, STRATEGY, parse_strategy
from fastmask.distill.base import Distiller, MatchingConfig, check_positive, stream_seed, train_stack
from fastmask.distill.synthetic import SyntheticSet, _check_data
from fastmask.optim import MaskedSGD
from fastmask.stack import Stack

METADATA_KEY = "fastmask.expert"
FORMAT_VERSION = 1


def flat_parameters(networks: Stack) -> Tensor:
    """The K networks' parameters as ``[K, P]``: each network's parameters flattened and
    concatenated in ``named_parameters`` order (the layout of ``parameter_layout``)."""
    return torch.cat([p.detach().flatten(1) for p in networks.model.parameters()], 1)


def parameter_layout(networks: Stack) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, per-model shape)`` of every parameter of a stack, in flattening order."""
    return [(name, tuple(p.shape[1:])) for name, p in networks.model.named_parameters()]


def unflatten(flat: Tensor, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """``[K, P]`` -> ``{name: [K, *shape]}`` views, for ``functional_call`` on a stacked model."""
    out, offset = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[:, offset:offset + size].view(flat.shape[0], *shape)
        offset += size
    if offset != flat.shape[1]:
        raise ValueError(f"flat parameters hold {flat.shape[1]} values but the layout {offset}")
    return out


class ExpertBuffer:
    """Trajectories of expert networks trained on real data (see the module docstring).

    Args:
        data: the real training set (normalised, on the device to train on).
        folder: where the experts' files live, or None to keep them in memory only.
        model, model_options: the experts' architecture (``fastmask.models.create``).
        epochs, lr, batch_size, augment: the experts' training: ``epochs`` epochs of SGD (no
            momentum, no weight decay) at ``lr``, batches of ``batch_size``, the DSA strategy
            ``augment`` (an independent draw per image) or None.
        seed: expert i's initial weights, data order and augmentation follow from ``seed`` and i
            (and from which experts train together in one stack).

    Example::

        buffer = ExpertBuffer(splits.train, "run/experts", epochs=50)
        buffer.prepare(10)                         # trains experts 0-9, or loads them from the folder
        start, later = buffer.checkpoints(3, [5, 7])   # expert 3's parameters after epochs 5 and 7
    """

    def __init__(self, data: Dataset, folder: str | os.PathLike | None, *, model: str = "convnet3",
                 model_options: dict | None = None, epochs: int = 50, lr: float = 0.01, batch_size: int = 256,
                 augment: str | None = STRATEGY, seed: int = 0):
        _check_data(data)
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if augment is not None:
            parse_strategy(augment)
        self.data, self.seed = data, seed
        self.folder = None if folder is None else Path(folder)
        self.model, self.model_options = model, dict(model_options or {})
        self.epochs, self.lr, self.batch_size, self.augment = epochs, lr, batch_size, augment
        with torch.random.fork_rng(devices=[]):
            template = Stack([models.create(model, data.num_classes, data.image_shape, **self.model_options)])
        self.layout = parameter_layout(template)
        # what makes two experts interchangeable: the data, the architecture and the training recipe
        recipe = {"format": FORMAT_VERSION,
                  "data": {"name": data.name, "size": len(data), "num_classes": data.num_classes,
                           "image_shape": list(data.image_shape),
                           "zca_eps": None if data.zca is None else data.zca.eps},
                  "model": model, "model_options": self.model_options, "epochs": epochs, "lr": lr,
                  "batch_size": batch_size, "augment": augment,
                  "layout": [[name, list(shape)] for name, shape in self.layout]}
        self.recipe = json.loads(json.dumps(recipe))
        self._trajectories: dict[int, Tensor] = {}  # in memory: without a folder, or trained this session
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.layout)

    def path(self, expert: int) -> Path:
        return self.folder / f"expert_{expert:04d}.safetensors"

    def _has(self, expert: int) -> bool:
        """Whether expert ``expert`` is available: in memory, or in the folder with this recipe."""
        if expert in self._trajectories:
            return True
        if self.folder is None or not self.path(expert).exists():
            return False
        from safetensors import safe_open

        with safe_open(str(self.path(expert)), framework="pt") as file:
            metadata = file.metadata() or {}
            shape = file.get_slice("trajectory").get_shape() if "trajectory" in file.keys() else None
        if METADATA_KEY not in metadata:
            raise ValueError(f"{self.path(expert)}: not an expert file (no {METADATA_KEY!r} metadata)")
        recipe = json.loads(metadata[METADATA_KEY])
        if recipe != self.recipe:
            differ = sorted(k for k in {*recipe, *self.recipe} if recipe.get(k) != self.recipe.get(k))
            raise ValueError(f"{self.path(expert)} holds an expert trained with another recipe (differs in {differ}); "
                             f"use another folder for these experts")
        if shape != [self.epochs + 1, self.num_parameters]:
            raise ValueError(f"{self.path(expert)}: trajectory of shape {shape}, expected "
                             f"{[self.epochs + 1, self.num_parameters]}")
        return True

    def prepare(self, count: int, *, parallel: int = 10, progress: bool = True) -> float:
        """Make experts ``0 .. count - 1`` available: those in the folder (same recipe) are reused,
        the others trained, ``parallel`` at a time as one stack, and saved. Returns the seconds
        spent training."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise ValueError(f"parallel must be a positive int, got {parallel!r}")
        missing = [i for i in range(count) if not self._has(i)]
        start = time.perf_counter()
        for first in range(0, len(missing), parallel):
            self._train(missing[first:first + parallel], progress)
        self.count = max(self.count, count)
        return time.perf_counter() - start if missing else 0.0

    def _train(self, experts: list[int], progress: bool) -> None:
        data, K = self.data, len(experts)
        with torch.random.fork_rng(devices=[]):
            built = []
            for i in experts:
                torch.manual_seed(stream_seed(self.seed, f"expert {i}"))
                built.append(models.create(self.model, data.num_classes, data.image_shape, **self.model_options))
        networks = Stack(built).to(data.device).train()
        optimizer = MaskedSGD.from_model(networks, lr=self.lr)
        generator = torch.Generator(data.device).manual_seed(stream_seed(self.seed, f"expert orders {experts[0]}"))
        augment = None
        if self.augment is not None:
            augment = DSA(self.augment, seed=stream_seed(self.seed, f"expert augment {experts[0]}"), device=data.device)
        snapshots = [flat_parameters(networks).cpu()]
        bar = tqdm(range(self.epochs), desc=f"experts {experts[0]}-{experts[-1]}", disable=not progress, leave=False)
        for _ in bar:
            order = torch.rand(K, len(data), generator=generator, device=data.device).argsort(-1)
            train_stack(networks, optimizer, data.images, data.labels, order, self.batch_size, augment)
            snapshots.append(flat_parameters(networks).cpu())
        trajectories = torch.stack(snapshots, 1)  # [K, epochs + 1, P]
        for k, expert in enumerate(experts):
            trajectory = trajectories[k].clone()
            if self.folder is not None:
                io.save_tensors(self.path(expert), {"trajectory": trajectory},
                                metadata={METADATA_KEY: json.dumps(self.recipe)})
            self._trajectories[expert] = trajectory

    def trajectory(self, expert: int) -> Tensor:
        """Expert ``expert``'s parameters at every epoch, ``[epochs + 1, P]`` (CPU, float32)."""
        return self.checkpoints(expert, range(self.epochs + 1))

    def checkpoints(self, expert: int, epochs: Sequence[int]) -> Tensor:
        """Expert ``expert``'s parameters after each of ``epochs`` (0 = initial), ``[len(epochs), P]``
        (CPU, float32); from a file only those rows are read."""
        if not 0 <= expert < self.count:
            raise ValueError(f"expert must lie in [0, {self.count}) (prepare() the buffer first), got {expert}")
        epochs = list(epochs)
        if not all(0 <= e <= self.epochs for e in epochs):
            raise ValueError(f"epochs must lie in [0, {self.epochs}], got {epochs}")
        if expert in self._trajectories:
            return self._trajectories[expert][epochs]
        from safetensors import safe_open

        with safe_open(str(self.path(expert)), framework="pt") as file:
            rows = file.get_slice("trajectory")
            return torch.cat([rows[e:e + 1] for e in epochs])


@dataclasses.dataclass
class MTTConfig(MatchingConfig):
    """MTT's options (defaults: ``shared/reference.md``'s CIFAR-10 IPC 10 settings)."""

    iterations: int = 5000
    num_networks: int = 1  # K students per iteration, each from its own expert and start epoch
    batch_real: int = 256  # the experts' batch (real images per SGD step; MTT's batch_train)
    augment: str | None = STRATEGY  # DSA for the students' steps and the experts' training
    syn_steps: int = 30  # N student steps per iteration
    expert_epochs: int = 2  # M: the target is the expert M epochs after the start
    max_start_epoch: int = 20  # start epochs are drawn from [0, max_start_epoch)
    lr: float = 100.0  # SGD on the images
    momentum: float = 0.5  # of both the image and the learning-rate optimizers
    lr_lr: float = 1e-5  # SGD on the students' learning rate
    lr_teacher: float = 1e-3  # the students' initial learning rate
    batch_syn: int | None = None  # synthetic images per student step; None: all of them
    experts: int = 100
    expert_train_epochs: int = 50
    expert_lr: float = 0.01
    buffer: str | None = None  # the experts' folder (reused when it holds them); None: in memory only

    def __post_init__(self):
        super().__post_init__()
        for name in ("syn_steps", "expert_epochs", "max_start_epoch", "experts", "expert_train_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_start_epoch + self.expert_epochs - 1 > self.expert_train_epochs:
            raise ValueError(f"max_start_epoch - 1 + expert_epochs = {self.max_start_epoch - 1 + self.expert_epochs} "
                             f"exceeds expert_train_epochs = {self.expert_train_epochs}")
        check_positive(self, "lr", "lr_lr", "lr_teacher", "expert_lr")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.batch_syn is not None and (not isinstance(self.batch_syn, int) or self.batch_syn < 1):
            raise ValueError(f"batch_syn must be None or a positive int, got {self.batch_syn!r}")
        if self.buffer is not None and not isinstance(self.buffer, (str, os.PathLike)):
            raise TypeError(f"buffer must be a folder path or None, got {type(self.buffer).__name__}")
        if self.buffer is not None:
            self.buffer = os.fspath(self.buffer)


class TrajectoryMatching(Distiller):
    """MTT distillation (see the module docstring)."""

    method = "mtt"

    def __init__(self, data, images_per_class, config: MTTConfig = MTTConfig(), **options):
        super().__init__(data, images_per_class, config, **options)
        self.networks.requires_grad_(False)  # the students run on flat parameter vectors instead
        self.layout = parameter_layout(self.networks)
        self.buffer = ExpertBuffer(data, config.buffer, model=self.model_name, model_options=self.model_options,
                                   epochs=config.expert_train_epochs, lr=config.expert_lr,
                                   batch_size=config.batch_real, augment=config.augment, seed=self.seed)
        total = self.num_classes * images_per_class
        self.batch_syn = total if config.batch_syn is None else min(config.batch_syn, total)
        self.labels = torch.arange(self.num_classes, device=data.device).repeat_interleave(images_per_class)
        self.lr = torch.tensor(float(config.lr_teacher), device=data.device, requires_grad=True)
        self.image_optimizer = torch.optim.SGD([self.images], lr=config.lr, momentum=config.momentum)
        self.lr_optimizer = torch.optim.SGD([self.lr], lr=config.lr_lr, momentum=config.momentum)
        self.choice = torch.Generator().manual_seed(stream_seed(self.seed, "experts"))  # CPU: no GPU sync
        self.expert_seconds = 0.0

    def prepare_experts(self, progress: bool = True) -> None:
        """Train (or load) the expert buffer; ``run`` does it first."""
        self.expert_seconds += self.buffer.prepare(self.config.experts, progress=progress)

    def run(self, progress: bool = True) -> SyntheticSet:
        self.prepare_experts(progress)
        return super().run(progress)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "learned_lr": float(self.lr.detach()),
                "expert_seconds": self.expert_seconds}

    def expert_targets(self) -> tuple[Tensor, Tensor]:
        """For each student, an expert and a start epoch t drawn uniformly: the expert's
        parameters at t and at t + M, ``[K, P]`` each, on the device."""
        K, config = self.num_networks, self.config
        experts = torch.randint(len(self.buffer), (K,), generator=self.choice).tolist()
        starts = torch.randint(config.max_start_epoch, (K,), generator=self.choice).tolist()
        rows = torch.stack([self.buffer.checkpoints(e, [t, t + config.expert_epochs]) for e, t in zip(experts, starts)])
        rows = rows.to(self.data.device, non_blocking=True)
        return rows[:, 0], rows[:, 1]

    def batch_indices(self) -> Tensor:
        """``[N, K, batch_syn]``: the synthetic images of each student step. Each student goes
        through random permutations of the set in chunks of ``batch_syn`` (a remainder smaller
        than a chunk is skipped, so that all K students take equal batches)."""
        K, N, total, batch = self.num_networks, self.config.syn_steps, len(self.labels), self.batch_syn
        per_permutation = total // batch
        permutations = math.ceil(N / per_permutation)
        keys = torch.rand(K, permutations, total, generator=self.generator, device=self.labels.device)
        chunks = keys.argsort(-1)[..., :per_permutation * batch].reshape(K, permutations * per_permutation, batch)
        return chunks[:, :N].transpose(0, 1)

    def unroll(self, start: Tensor) -> Tensor:
        """N student steps from ``start`` ``[K, P]`` on the current images and learning rate;
        returns the final parameters, differentiable with respect to both."""
        images = self.images.flatten(0, 1)
        K = self.num_networks
        params = start.clone().requires_grad_(True)
        for index in self.batch_indices():
            batch = images[index]
            if self.augment is not None:
                batch = self.augment(batch)
            logits = functional_call(self.networks.model, unflatten(params, self.layout), (batch,))
            losses = F.cross_entropy(logits.flatten(0, 1), self.labels[index].flatten(), reduction="none")
            (grad,) = torch.autograd.grad(losses.view(K, -1).mean(1).sum(), params, create_graph=True)
            params = params - self.lr * grad
        return params

    def loss(self, start: Tensor, target: Tensor) -> Tensor:
        """The normalised parameter distance after the unroll, averaged over the K students."""
        final = self.unroll(start)
        return ((final - target).pow(2).sum(1) / (start - target).pow(2).sum(1)).mean()

    def step(self) -> Tensor:
        if len(self.buffer) == 0:
            raise RuntimeError("the expert buffer is empty: call prepare_experts() (run() does) before step()")
        loss = self.loss(*self.expert_targets())
        self.images.grad, self.lr.grad = torch.autograd.grad(loss, [self.images, self.lr])
        self.image_optimizer.step()
        self.lr_optimizer.step()
        return loss.detach()
