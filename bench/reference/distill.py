"""Distribution matching (DM, Zhao & Bilen 2023) as its reference code runs it: every iteration a
freshly initialised, frozen network per sampled network, and for it one class at a time, the
squared distance between the mean embeddings of a real batch and of the class's synthetic
images under one siamese DSA draw; one SGD step on the images per iteration.

Also: the "random real images" baseline, and the evaluation of a synthetic set (fresh networks
trained on it alone, one after another, tested on the real test set).

Example::

    images, labels = distribution_matching(train_images, train_labels, 10, 10, iterations=200, num_networks=4,
                                           build=lambda: models.create("convnet3", 10, (3, 32, 32)), seed=0,
                                           device=device)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRATEGY = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _integer(generator: torch.Generator, low: int, high: int) -> int:  # in [low, high]
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _resample(images: Tensor, theta: list[list[float]]) -> Tensor:
    matrix = torch.tensor(theta, dtype=images.dtype, device=images.device).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def siamese_augment(batches: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """DSA in mode 'S': one transform group chosen at random and one parameter draw, applied
    alike to every image of every batch ``[N, C, H, W]`` (the real and the synthetic images of a
    class). The ranges are DSA's ``ParamDiffAug`` defaults."""
    group = STRATEGY[_integer(generator, 0, len(STRATEGY) - 1)]
    height, width = batches[0].shape[-2:]
    if group == "color":
        brightness, saturation, contrast = (_uniform(generator, -0.5, 0.5), _uniform(generator, 0, 2),
                                            _uniform(generator, 0.5, 1.5))

        def apply(x):
            x = x + brightness
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * saturation + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) * contrast + mean
    elif group == "crop":
        shift_y, shift_x = int(height * 0.125 + 0.5), int(width * 0.125 + 0.5)
        dy, dx = _integer(generator, -shift_y, shift_y), _integer(generator, -shift_x, shift_x)

        def apply(x):  # out[i, j] = in[i + dy, j + dx], zeros from outside
            padded = F.pad(x, (shift_x, shift_x, shift_y, shift_y))
            return padded[..., shift_y + dy:shift_y + dy + height, shift_x + dx:shift_x + dx + width]
    elif group == "cutout":
        size_y, size_x = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
        top = _integer(generator, 0, height - size_y % 2) - size_y // 2
        left = _integer(generator, 0, width - size_x % 2) - size_x // 2

        def apply(x):
            keep = torch.ones(height, width, dtype=x.dtype, device=x.device)
            keep[max(top, 0):max(top + size_y, 0), max(left, 0):max(left + size_x, 0)] = 0
            return x * keep
    elif group == "flip":
        mirrored = _uniform(generator, 0, 1) < 0.5

        def apply(x):
            return x.flip(-1) if mirrored else x
    elif group == "scale":
        sx, sy = _uniform(generator, 1 / 1.2, 1.2), _uniform(generator, 1 / 1.2, 1.2)

        def apply(x):
            return _resample(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])
    else:
        angle = _uniform(generator, -15, 15) * math.pi / 180
        cos, sin = math.cos(angle), math.sin(angle)

        def apply(x):
            return _resample(x, [[cos, sin, 0.0], [-sin, cos, 0.0]])
    return [apply(x) for x in batches]


def random_real(labels: Tensor, num_classes: int, images_per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``images_per_class`` random training images of every class, class by class."""
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < images_per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than images_per_class={images_per_class}")
        picked.append(members[torch.randperm(len(members), generator=generator)[:images_per_class]])
    return torch.cat(picked)


def distribution_matching(images: Tensor, labels: Tensor, num_classes: int, images_per_class: int, *,
                          iterations: int, num_networks: int, build: Callable[[], nn.Module], seed: int,
                          device: torch.device, batch_real: int = 256, lr: float = 1.0,
                          momentum: float = 0.5, augment: bool = True) -> tuple[Tensor, Tensor]:
    """DM from real-image initialisation; returns the synthetic images and labels (on the CPU)."""
    torch.manual_seed(seed)  # the random networks' initialisations
    generator = torch.Generator().manual_seed(seed)
    start = random_real(labels, num_classes, images_per_class, generator)
    synthetic = images[start].clone().to(device).requires_grad_()
    real = images.to(device)  # the reference code keeps the real images on the device
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    batch_real = min(batch_real, min(len(m) for m in members))
    optimizer = torch.optim.SGD([synthetic], lr=lr, momentum=momentum)
    for _ in range(iterations):
        loss = torch.zeros((), device=device)
        for _ in range(num_networks):
            net = build().to(device)
            for p in net.parameters():
                p.requires_grad_(False)
            net.train()
            for c in range(num_classes):
                chosen = members[c][torch.randperm(len(members[c]), generator=generator)[:batch_real]]
                real_c = real[chosen.to(device)]
                syn_c = synthetic[c * images_per_class:(c + 1) * images_per_class]
                if augment:
                    real_c, syn_c = siamese_augment([real_c, syn_c], generator)
                real_mean = net.embed(real_c).detach().mean(0)
                syn_mean = net.embed(syn_c).mean(0)
                loss = loss + ((real_mean - syn_mean) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        (loss / num_networks).backward()
        optimizer.step()
    synthetic_labels = torch.arange(num_classes).repeat_interleave(images_per_class)
    return synthetic.detach().cpu(), synthetic_labels
