"""IDC: dataset condensation with efficient synthetic-data parameterization (Kim et al., 2022).

Multi-formation. Each stored synthetic image is a full-size canvas of raw pixels (the [0, 1]
space before the dataset's normalisation, as IDC stores them) that holds ``factor x factor``
smaller images: ``decode`` cuts a canvas into ``factor x factor`` patches and upsamples each
(bilinear) back to full size, so ``images_per_class`` canvases train a network with
``images_per_class * factor**2`` images per class (factor 2: four per canvas). ``tile`` is the
way back used to start: each patch a real image of the class, downsampled (area average). Sides
that ``factor`` does not divide are padded with 0.5 before cutting, as IDC does.

One iteration (IDC's outer loop) draws K fresh random networks and repeats ``inner_loop`` times:

1. matching: for every network and class, the gradients of the mean cross-entropy of
   ``batch_real`` real images of the class and of the class's decoded synthetic images (at most
   ``batch_syn``, a random subset when there are more), the decoded images normalised like the
   real ones and both batches under one augmentation draw; the distance is the squared error
   between the gradients of the convolution weights (biases, norm parameters and the output
   layer are not matched: IDC's defaults); summed over classes, averaged over the K networks;
   one SGD step on the canvases (lr ``5e-3 x images_per_class / 10``, momentum 0.5);
2. then (except after the last matching step, where it would change nothing) each network
   trains on ``train_images`` random real images, ``batch_train`` at a time (SGD lr 0.01,
   momentum 0.9, weight decay 5e-4; augmented by ``augment_train``, an independent draw per
   image).

The canvases are clipped to [0, 1] at the start of every iteration (IDC) and in the result.
IDC's defaults for CIFAR-10: 2000 iterations of 100 matching steps, 2000 real images per network
update. Not reproduced: CutMix in the network update (and in IDC's evaluation, which trains 1000
epochs with DSA and CutMix; ``fastmask.distill.evaluate`` has its own protocol).

Augmentation follows IDC's rule over DSA's transforms and ranges (``MultiGroupAugment``): every
call applies the strategy's flip and colour groups, then one of its geometric groups (crop,
scale, rotate) chosen per call, then cutout; the default ``color_crop_cutout`` applies all three.

The per-class gradients of all classes and all K networks come from one forward and backward
(``GradientMatcher``, shared with DSA), where IDC's code runs one class at a time.

The result is a ``MultiFormationSet``: its ``images`` are the decoded training images
(normalised; ``images_per_class * factor**2`` per class, what ``as_dataset`` and ``evaluate``
train on) and its ``canvases`` the stored ones; ``save`` writes both into one safetensors file.

Example::

    from fastmask.distill import distill
    syn = distill("idc", splits.train, images_per_class=10)      # factor 2: 40 training images per class
    syn.canvases.shape                                            # [100, 3, 32, 32], raw pixels
    syn.images.shape                                              # [400, 3, 32, 32], normalised
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastmask import io
from fastmask.distill.augment import DSA, parse_strategy
from fastmask.distill.base import MatchingConfig, check_positive, redraw, stream_seed, train_stack
from fastmask.distill.dsa import GradientMatcher
from fastmask.distill.synthetic import METADATA_KEY as SET_METADATA_KEY, SyntheticSet, random_real
from fastmask.optim import MaskedSGD

METADATA_KEY = "fastmask.multiformation"
GEOMETRIC = ("crop", "scale", "rotate")


# ---------------------------------------------------------------------------------------------- multi-formation


def _patch_size(side: int, factor: int) -> int:
    return math.ceil(side / factor)


def _check_factor(factor) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")


def decode(canvases: Tensor, factor: int) -> Tensor:
    """``[..., n, C, H, W]`` canvases -> ``[..., n * factor**2, C, H, W]`` images: each canvas cut
    into ``factor x factor`` patches (row by row; sides padded with 0.5 to a multiple of
    ``factor``) and each patch upsampled to ``H x W`` (bilinear, ``align_corners=False``). The
    ``factor**2`` images of canvas i are images ``i * factor**2 ... (i + 1) * factor**2 - 1``."""
    _check_factor(factor)
    if canvases.dim() < 4:
        raise ValueError(f"canvases must be [..., n, C, H, W], got shape {tuple(canvases.shape)}")
    if factor == 1:
        return canvases
    *lead, count, channels, height, width = canvases.shape
    ph, pw = _patch_size(height, factor), _patch_size(width, factor)
    padded = F.pad(canvases, (0, factor * pw - width, 0, factor * ph - height), value=0.5)
    patches = padded.reshape(-1, channels, factor, ph, factor, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(-1, channels, ph, pw)
    images = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
    return images.view(*lead, count * factor * factor, channels, height, width)


def tile(images: Tensor, factor: int) -> Tensor:
    """``[..., n * factor**2, C, H, W]`` images -> ``[..., n, C, H, W]`` canvases: every
    ``factor**2`` consecutive images downsampled (area average) to one patch each and laid out
    row by row, the inverse layout of ``decode`` (IDC's initialisation from real images)."""
    _check_factor(factor)
    if images.dim() < 4 or images.shape[-4] % (factor * factor):
        raise ValueError(f"images must be [..., n * factor**2, C, H, W] with factor={factor}, "
                         f"got shape {tuple(images.shape)}")
    if factor == 1:
        return images
    *lead, total, channels, height, width = images.shape
    ph, pw = _patch_size(height, factor), _patch_size(width, factor)
    small = F.interpolate(images.reshape(-1, channels, height, width), size=(ph, pw), mode="area")
    canvases = small.view(-1, factor, factor, channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    canvases = canvases.reshape(-1, channels, factor * ph, factor * pw)[..., :height, :width]
    return canvases.reshape(*lead, total // (factor * factor), channels, height, width)


@dataclasses.dataclass(eq=False)
class MultiFormationSet(SyntheticSet):
    """A synthetic set decoded from stored canvases (IDC).

    ``images`` / ``labels`` / ``images_per_class`` describe the decoded training images (what
    ``as_dataset``, ``evaluate`` and ``save_grid`` use); ``canvases`` ``[classes * stored, C, H, W]``
    are the stored images in raw pixels (class by class), ``factor`` their multi-formation factor,
    so ``images_per_class == stored * factor**2``. ``save`` adds the canvases to the set's file
    (tensor ``"canvases"``, factor under the metadata key ``"fastmask.multiformation"``):
    ``SyntheticSet.load`` reads such a file as a plain set of the decoded images,
    ``MultiFormationSet.load`` with its canvases.
    """

    canvases: Tensor | None = None
    factor: int = 2

    def __post_init__(self):
        super().__post_init__()
        _check_factor(self.factor)
        canvases = self.canvases
        if not isinstance(canvases, Tensor) or canvases.dim() != 4 or not canvases.is_floating_point():
            raise TypeError(f"canvases must be a floating tensor [N, C, H, W], got {type(canvases).__name__}")
        if canvases.shape[1:] != self.images.shape[1:] or canvases.shape[0] * self.factor**2 != len(self.images):
            raise ValueError(f"canvases of shape {tuple(canvases.shape)} with factor {self.factor} do not decode to "
                             f"the {len(self.images)} images of shape {tuple(self.images.shape[1:])}")
        if canvases.device != self.images.device:
            raise ValueError(f"canvases are on {canvases.device} but images are on {self.images.device}")

    @property
    def canvases_per_class(self) -> int:
        return self.images_per_class // self.factor**2

    def to(self, device) -> "MultiFormationSet":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device),
                                   mean=self.mean.to(device), std=self.std.to(device),
                                   zca=None if self.zca is None else self.zca.to(device),
                                   canvases=self.canvases.to(device))

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically): the decoded set as ``SyntheticSet.save`` writes
        it, plus the canvases."""
        tensors = {"images": self.images, "labels": self.labels, "mean": self.mean, "std": self.std,
                   "canvases": self.canvases}
        if self.zca is not None:
            tensors.update(zca_mean=self.zca.mean, zca_matrix=self.zca.matrix,
                           zca_inverse_matrix=self.zca.inverse_matrix)
        metadata = {SET_METADATA_KEY: json.dumps(self._info()), METADATA_KEY: json.dumps({"factor": self.factor})}
        io.save_tensors(path, tensors, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MultiFormationSet":
        """Read a file written by ``MultiFormationSet.save`` onto ``device``."""
        from safetensors import safe_open

        decoded = SyntheticSet.load(path, device)
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if METADATA_KEY not in metadata or "canvases" not in file.keys():
                raise ValueError(f"{path}: a synthetic set without canvases (not written by MultiFormationSet.save)")
            canvases = file.get_tensor("canvases").to(device)
        fields = {f.name: getattr(decoded, f.name) for f in dataclasses.fields(SyntheticSet)}
        return cls(**fields, canvases=canvases, factor=json.loads(metadata[METADATA_KEY])["factor"])


# ---------------------------------------------------------------------------------------------- augmentation


class Chain:
    """Transforms applied in turn (each a ``fastmask.distill.augment.Transform``)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, images: Tensor) -> Tensor:
        for transform in self.transforms:
            images = transform(images)
        return images


class MultiGroupAugment:
    """IDC's augmentation rule over DSA's transforms: every call applies the strategy's ``flip``
    and ``color`` groups, then one of its geometric groups (``crop``, ``scale``, ``rotate``) chosen
    per call, then ``cutout``. ``sample(shape, image_size)`` draws the parameters for every entry of
    ``shape`` (as ``DSA.sample``); calling it on images draws one set per image."""

    def __init__(self, strategy: str, *, seed: int = 0, device: str | torch.device = "cpu"):
        groups = parse_strategy(strategy)
        self.dsa = DSA(strategy, seed=seed, device=device)
        self.before = [g for g in ("flip", "color") if g in groups]
        self.geometric = [g for g in groups if g in GEOMETRIC]
        self.after = ["cutout"] if "cutout" in groups else []
        self._choice = torch.Generator().manual_seed(seed)

    def sample(self, shape, image_size: tuple[int, int]) -> Chain:
        groups = list(self.before)
        if self.geometric:
            groups.append(self.geometric[int(torch.randint(len(self.geometric), (1,), generator=self._choice))])
        groups += self.after
        return Chain(self.dsa.sample_group(group, shape, image_size) for group in groups)

    def __call__(self, images: Tensor) -> Tensor:
        return self.sample(images.shape[:-3], tuple(images.shape[-2:]))(images)


# ---------------------------------------------------------------------------------------------- the method


@dataclasses.dataclass
class IDCConfig(MatchingConfig):
    """IDC's options (defaults: the paper's code for CIFAR-10 with ConvNet-3)."""

    iterations: int = 2000  # outer iterations, each with fresh networks
    batch_real: int = 64  # real images per class and network per matching step
    augment: str | None = "color_crop_cutout"  # the matching augmentation (siamese, one draw per class)
    factor: int = 2  # multi-formation: factor**2 training images per stored image
    inner_loop: int = 100  # matching steps per iteration
    batch_syn: int = 128  # decoded synthetic images per class per matching step, at most
    lr: float | None = None  # SGD on the canvases; None: 5e-3 x images_per_class / 10 (IDC's rule)
    momentum: float = 0.5
    lr_net: float = 0.01  # the networks' SGD on real data between matching steps
    momentum_net: float = 0.9
    weight_decay_net: float = 5e-4
    train_images: int = 2000  # real images per network between matching steps (IDC's n_data)
    batch_train: int = 64
    augment_train: str | None = "color_crop"  # an independent draw per image, or None

    def __post_init__(self):
        super().__post_init__()
        _check_factor(self.factor)
        for name in ("inner_loop", "batch_syn", "train_images", "batch_train"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_positive(self, "lr_net")
        if self.lr is not None:
            check_positive(self, "lr")
        for name in ("momentum", "momentum_net"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.weight_decay_net >= 0:
            raise ValueError(f"weight_decay_net must be >= 0, got {self.weight_decay_net}")
        if self.augment_train is not None:
            parse_strategy(self.augment_train)

    def image_lr(self, images_per_class: int) -> float:
        return 5e-3 * images_per_class / 10 if self.lr is None else self.lr


class IDC(GradientMatcher):
    """IDC distillation (see the module docstring). ``images`` holds the canvases
    ``[classes, images_per_class, C, H, W]`` in raw pixels."""

    method = "idc"

    def __init__(self, data, images_per_class, config: IDCConfig = IDCConfig(), **options):
        super().__init__(data, images_per_class, config, **options)
        self.factor = config.factor
        self.decoded_per_class = images_per_class * config.factor**2
        self.batch_syn = min(config.batch_syn, self.decoded_per_class)
        self.train_count = min(config.train_images, len(data))
        self.image_optimizer = torch.optim.SGD([self.images], lr=config.image_lr(images_per_class),
                                               momentum=config.momentum)
        if config.augment is not None:
            self.augment = MultiGroupAugment(config.augment, seed=stream_seed(self.seed, "augment"), device=data.device)
        self.augment_train = None
        if config.augment_train is not None:
            self.augment_train = MultiGroupAugment(config.augment_train, seed=stream_seed(self.seed, "augment train"),
                                                   device=data.device)
        self.network_optimizer = None

    def initial_images(self) -> Tensor:
        """Canvases ``[classes, images_per_class, C, H, W]``: ``init="real"`` tiles
        ``factor**2`` downsampled real images of the class into each (drawn as ``random_real``
        draws ``images_per_class * factor**2`` of them); ``"noise"`` is IDC's N(0.5, 0.25^2)
        clipped to [0, 1]."""
        data, count, factor = self.data, self.images_per_class, self.config.factor
        shape = (data.num_classes, count, *data.image_shape)
        if self.init == "noise":
            noise = torch.randn(shape, generator=self.generator, device=data.device)
            return (noise / 4 + 0.5).clamp(0, 1)
        needed = count * factor**2
        smallest = int(torch.bincount(data.labels, minlength=data.num_classes).min())
        if needed > smallest:
            raise ValueError(f"init='real' with factor {factor} needs images_per_class x factor**2 = {needed} real "
                             f"images per class, but the smallest class of data has {smallest}")
        real = random_real(data, needed, self.seed).images
        pixels = data.denormalize(real).clamp(0, 1)
        return tile(pixels.view(data.num_classes, needed, *data.image_shape), factor)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "image_lr": self.image_optimizer.defaults["lr"]}

    @staticmethod
    def matches(stacked: Tensor) -> bool:
        """Convolution weights only (``[K, O, C, R, S]``): IDC matches neither biases and norm
        parameters nor the output layer."""
        return stacked.dim() >= 5

    @staticmethod
    def distance(real: Tensor, syn: Tensor) -> Tensor:
        """IDC's ``mse``: the summed squared difference of the gradients."""
        return (real - syn).pow(2).sum()

    def decoded(self, canvases: Tensor | None = None) -> Tensor:
        """The canvases (default: the current ones) decoded and normalised like the real data:
        ``[classes, images_per_class * factor**2, C, H, W]``."""
        canvases = self.images if canvases is None else canvases
        return self.data.normalize(decode(canvases, self.factor))

    def synthetic_batch(self, transform) -> Tensor:
        """``[K, classes, n, C, H, W]``: per network and class, the decoded images (a random subset
        of ``batch_syn`` of them when there are more) under ``transform``."""
        decoded = self.decoded()
        K, classes, total = self.num_networks, self.num_classes, self.decoded_per_class
        if self.batch_syn < total:
            keys = torch.rand(K, classes, total, generator=self.generator, device=decoded.device)
            pick = keys.topk(self.batch_syn, dim=-1, sorted=False).indices
            batch = decoded[torch.arange(classes, device=decoded.device)[:, None], pick]
        else:
            batch = decoded.expand(K, *decoded.shape)
        return batch if transform is None else transform(batch)

    def train_on_real(self) -> None:
        """Each network trains on ``train_images`` random real images (distinct, its own draw)."""
        K, device = self.num_networks, self.data.device
        keys = torch.rand(K, len(self.data), generator=self.generator, device=device)
        order = keys.topk(self.train_count, dim=-1).indices  # sorted by key: a random order
        train_stack(self.networks, self.network_optimizer, self.data.images, self.data.labels, order,
                    self.config.batch_train, self.augment_train)

    def step(self) -> Tensor:
        config = self.config
        redraw(self.networks, self.generator)
        self.networks.train()
        self.network_optimizer = MaskedSGD.from_model(self.networks, lr=config.lr_net, momentum=config.momentum_net,
                                                      weight_decay=config.weight_decay_net)
        with torch.no_grad():
            self.images.clamp_(0, 1)
        total = 0
        for inner in range(config.inner_loop):
            total = total + self.match()
            if inner < config.inner_loop - 1:
                self.train_on_real()
        return total / config.inner_loop

    def result(self) -> MultiFormationSet:
        data = self.data
        with torch.no_grad():
            canvases = self.images.detach().clamp(0, 1)
            images = self.decoded(canvases).flatten(0, 1)
        labels = torch.arange(self.num_classes, device=data.device).repeat_interleave(self.decoded_per_class)
        return MultiFormationSet(images, labels, self.num_classes, self.method, self.decoded_per_class, data.name,
                                 data.mean, data.std, data.zca, data.classes, self.hyperparameters(), self.seconds,
                                 canvases=canvases.flatten(0, 1).clone(), factor=self.factor)
