"""What every distillation method shares: the synthetic images, random networks as one stack,
real batches of every class at once, the siamese augmentation, and the run loop.

A method subclasses ``Distiller`` and implements ``step()`` (one iteration of the paper's
algorithm); ``run()`` calls it ``iterations`` times and returns the ``SyntheticSet``.

The synthetic images are one leaf tensor ``[classes, images_per_class, C, H, W]`` so that all
classes are updated by one optimizer step, and every forward pass takes all classes (and all K
networks) at once, where the reference code runs one network and one class per forward: that
batching is what ``bench/bench_distill.py`` measures against the reference's loops on a GPU.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from fastmask import models
from fastmask.data import Dataset
from fastmask.distill.augment import DSA, STRATEGY, Transform, parse_strategy
from fastmask.distill.synthetic import SyntheticSet, _check_data, _check_images_per_class, random_real
from fastmask.stack import StackedBatchNorm2d, StackedGroupNorm, StackedMaskedConv2d, StackedMaskedLinear, Stack

INITS = ("real", "noise")


@dataclasses.dataclass
class MatchingConfig:
    """Options every method has (each method's config adds its own)."""

    iterations: int = 1000
    num_networks: int = 1  # K random networks per iteration, run as one stack
    batch_real: int = 256  # real images per class and network per matching step (capped by the smallest class)
    augment: str | None = STRATEGY  # the DSA strategy, or None for no augmentation

    def __post_init__(self):
        for name in ("iterations", "num_networks", "batch_real"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "iterations" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'iterations' else 'positive'} int, "
                                 f"got {value!r}")
        if self.augment is not None:
            parse_strategy(self.augment)


def stream_seed(seed: int, stream: str) -> int:
    """A generator seed for one named use of ``seed``: generators seeded alike would draw the same
    numbers for unrelated choices (the initial images, the networks, the augmentation)."""
    entropy = [seed, *stream.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] & (2**63 - 1))


def redraw(stack: Stack, generator: torch.Generator) -> None:
    """Give the K networks of ``stack`` fresh random weights, in place, from ``generator``.

    The draw has the distribution of torch's default initialisation, the one every
    ``fastmask.models`` network starts from: conv and linear weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a = sqrt(5)), norm scales 1 and
    shifts 0, running statistics reset. One ``uniform_`` per stacked tensor serves all K models,
    where building K models and stacking them would cost Python time every iteration.
    """
    with torch.no_grad():
        for module in stack.model.modules():
            if isinstance(module, (StackedMaskedConv2d, StackedMaskedLinear)):
                fan_in = math.prod(module.weight.shape[2:])
                bound = 1 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=generator).mul_(module.mask)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, (StackedGroupNorm, StackedBatchNorm2d)):
                if getattr(module, "weight", None) is not None:
                    module.weight.fill_(1)
                    module.bias.zero_()
                if isinstance(module, StackedBatchNorm2d) and module.track_running_stats:
                    module.reset_running_stats()
            elif list(module.parameters(recurse=False)):
                raise TypeError(f"cannot redraw the parameters of a stacked {type(module).__name__}")


class RealSampler:
    """Draws ``[K, classes, n]`` indices of real images: for each network and class, n distinct
    images of that class, all in a few batched ops on the device (no loop over classes).

    Each class's indices sit in a row of a padded table; random keys, -1 on the padding, and a
    top-n per row pick n distinct members uniformly.
    """

    def __init__(self, data: Dataset):
        counts = torch.bincount(data.labels, minlength=data.num_classes).cpu()
        self.smallest = int(counts.min())
        widest = int(counts.max())
        table = torch.zeros(data.num_classes, widest, dtype=torch.int64)
        for c in range(data.num_classes):
            table[c, : counts[c]] = data.class_indices(c).cpu()
        self.table = table.to(data.device)
        self.padding = (torch.arange(widest)[None, :] >= counts[:, None]).to(data.device)

    def sample(self, num_networks: int, count: int, generator: torch.Generator) -> Tensor:
        if not 1 <= count <= self.smallest:
            raise ValueError(f"count must lie in [1, {self.smallest}] (the smallest class), got {count}")
        shape = (num_networks, *self.table.shape)
        keys = torch.rand(shape, generator=generator, device=self.table.device).masked_fill_(self.padding, -1)
        positions = keys.topk(count, dim=-1, sorted=False).indices
        return self.table.expand(shape).gather(-1, positions)


class Distiller:
    """The state of one distillation run; subclasses implement ``step``.

    Args:
        data: the real training set (normalised, on the device to distil on).
        images_per_class: synthetic images per class.
        config: the method's config (a ``MatchingConfig`` subclass).
        model, model_options: the architecture of the random networks (``fastmask.models.create``).
        init: ``"real"`` (random real images of each class) or ``"noise"`` (standard normal
            pixels in the normalised space).
        seed: every random choice (init, networks, real batches, augmentation) follows from it;
            ``init="real"`` picks the images ``random_real(data, images_per_class, seed)`` picks.
    """

    method = ""

    def __init__(self, data: Dataset, images_per_class: int, config: MatchingConfig, *, model: str = "convnet3",
                 model_options: dict | None = None, init: str = "real", seed: int = 0):
        _check_data(data)
        _check_images_per_class(images_per_class, data)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.data, self.config, self.seed = data, config, seed
        self.images_per_class, self.num_classes = images_per_class, data.num_classes
        self.model_name, self.model_options, self.init = model, dict(model_options or {}), init
        device = data.device
        self.generator = torch.Generator(device).manual_seed(stream_seed(seed, "distill"))
        self.images = self.initial_images().clone().requires_grad_()
        with torch.random.fork_rng(devices=[]):  # the weights are redrawn every iteration: leave the global RNG be
            self.networks = Stack([models.create(model, data.num_classes, data.image_shape, **self.model_options)
                                   for _ in range(config.num_networks)]).to(device)
        self.sampler = RealSampler(data)
        self.batch_real = min(config.batch_real, self.sampler.smallest)
        self.augment = None
        if config.augment is not None:
            self.augment = DSA(config.augment, seed=stream_seed(seed, "augment"), device=device)
        self.seconds = 0.0

    def initial_images(self) -> Tensor:
        """The images the run starts from, ``[classes, images_per_class, C, H, W]`` (a method may store
        its images differently and override this)."""
        data, count = self.data, self.images_per_class
        if self.init == "real":
            start = random_real(data, count, self.seed).images
        else:
            start = torch.randn((count * data.num_classes, *data.image_shape), generator=self.generator,
                                device=data.device)
        return start.view(data.num_classes, count, *data.image_shape)

    @property
    def num_networks(self) -> int:
        return self.config.num_networks

    def real_batch(self) -> Tensor:
        """``[K, classes, batch_real, C, H, W]``: fresh real images of every class for every network."""
        return self.data.images[self.sampler.sample(self.num_networks, self.batch_real, self.generator)]

    def siamese(self) -> Transform | None:
        """One augmentation draw per network and class, for both the real and the synthetic batch."""
        if self.augment is None:
            return None
        return self.augment.sample((self.num_networks, self.num_classes, 1), self.data.image_shape[1:])

    def synthetic_batch(self, transform: Transform | None) -> Tensor:
        """``[K, classes, images_per_class, C, H, W]``: the synthetic images as network k sees them."""
        images = self.images.expand(self.num_networks, *self.images.shape)
        return images if transform is None else transform(images)

    def step(self) -> Tensor:
        """One iteration of the method; returns its matching loss (a 0-d tensor, not synchronised)."""
        raise NotImplementedError

    def run(self, progress: bool = True) -> SyntheticSet:
        """``config.iterations`` steps, then the result."""
        start = time.perf_counter()
        bar = tqdm(range(self.config.iterations), desc=f"distill {self.method}", disable=not progress, leave=False)
        for iteration in bar:
            loss = self.step()
            if progress and iteration % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}")
        if self.images.is_cuda:
            torch.cuda.synchronize(self.images.device)
        self.seconds += time.perf_counter() - start
        return self.result()

    def hyperparameters(self) -> dict:
        return {**dataclasses.asdict(self.config), "model": self.model_name, "model_options": self.model_options,
                "init": self.init, "seed": self.seed}

    def result(self) -> SyntheticSet:
        """The synthetic set as it stands."""
        data = self.data
        labels = torch.arange(self.num_classes, device=data.device).repeat_interleave(self.images_per_class)
        return SyntheticSet(self.images.detach().flatten(0, 1).clone(), labels, self.num_classes, self.method,
                            self.images_per_class, data.name, data.mean, data.std, data.zca, data.classes,
                            self.hyperparameters(), self.seconds)


def train_stack(networks: Stack, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, order: Tensor,
                batch_size: int, augment: Callable[[Tensor], Tensor] | None = None) -> None:
    """One pass of the K networks of ``networks``, each over its own sequence of examples: row k of
    ``order`` ``[K, n]`` indexes ``images`` / ``labels`` in network k's order, ``batch_size`` at a time
    (the last batch may be smaller). ``augment``, if given, maps each batch ``[K, B, C, H, W]``
    (e.g. a ``DSA``: an independent draw per image). Each network's loss is its mean cross-entropy."""
    K = order.shape[0]
    for start in range(0, order.shape[1], batch_size):
        index = order[:, start:start + batch_size]
        batch = images[index]
        if augment is not None:
            batch = augment(batch)
        logits = networks(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(), reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss.view(K, -1).mean(1).sum().backward()
        optimizer.step()


def check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
