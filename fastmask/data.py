"""Datasets as tensors on the training device, and K-model mini-batches with device-side augmentation.

Every dataset is a pair of float32 images ``[N, C, H, W]`` and int64 labels ``[N]`` that live on
the device that trains on them; nothing goes through a ``DataLoader`` during training.

The datasets (``DATASETS``: ``digits``, ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``,
``imagefolder``, ``synthetic``) and the files they are read from: see ``fastmask.sources``.

``load`` (or ``from_tensors`` for tensors a user brings) optionally holds out a stratified
validation split and keeps a stratified subset of the training split (``train_size``, for
CPU-sized runs), normalises per channel with the training split's statistics, and optionally
ZCA-whitens (fitted on the training split, as MTT does). Every random choice takes ``seed``.

``Loader`` draws mini-batches for a stack of K models: model k shuffles and augments (random
crop with zero padding, horizontal flip) from ``seeds[k]`` alone, so each model of a stack sees
the batches it would see trained alone (the "SGD noise" of linear mode connectivity). A batch is
a pure function of (seed, step), so training resumed at step t gets the uninterrupted run's data.

Example::

    from fastmask import data

    splits = data.load("digits", device="cuda", val_fraction=0.1, seed=0)
    loader = data.Loader(splits.train, batch_size=64, seeds=[0, 1], augment=False)
    for step in range(1000):
        inputs, targets = loader.batch(step)        # [2, 64, 1, 8, 8], [2, 64]
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastmask.sources import DATASETS, SOURCES, describe

ZCA_EPS = 0.1  # MTT's regularisation of the covariance eigenvalues


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ZCA:
    """A ZCA whitening fitted on training images: ``x -> (x - mean) @ matrix`` on flattened images.

    ``matrix = U diag((S + eps)^-1/2) U^T`` for the eigen-decomposition ``U diag(S) U^T`` of the
    training images' covariance (unbiased, over flattened C*H*W features). Keep it to whiten
    other images (a distilled set lives in the whitened space) and to undo it for display.

    Example::

        zca = ZCA.fit(train_images, eps=0.1)
        white = zca(train_images)
        back = zca.inverse(white)       # == train_images up to rounding
    """

    mean: torch.Tensor  # [D] float32, D = C*H*W
    matrix: torch.Tensor  # [D, D] float32, symmetric
    inverse_matrix: torch.Tensor  # [D, D] float32, symmetric
    eps: float

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = ZCA_EPS, chunk: int = 4096) -> "ZCA":
        """Fit on ``images`` ``[N, C, H, W]`` (covariance accumulated in float64, ``chunk`` rows at a time)."""
        _check_images(images, "images")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if images.shape[0] < 2:
            raise ValueError(f"images: ZCA needs at least 2 images to estimate a covariance, got {images.shape[0]}")
        flat = images.reshape(images.shape[0], -1)
        n, d = flat.shape
        total = torch.zeros(d, dtype=torch.float64, device=flat.device)
        for start in range(0, n, chunk):
            total += flat[start : start + chunk].double().sum(0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for start in range(0, n, chunk):
            centred = flat[start : start + chunk].double() - mean
            cov += centred.T @ centred
        cov /= n - 1
        eigvals, eigvecs = torch.linalg.eigh(cov)
        # eigh can return tiny negative eigenvalues for a singular covariance; they are zeros.
        eigvals = eigvals.clamp_min(0) + eps
        matrix = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
        inverse_matrix = (eigvecs * eigvals.sqrt()) @ eigvecs.T
        return cls(mean.float(), matrix.float(), inverse_matrix.float(), float(eps))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten ``images`` ``[..., C, H, W]`` (same shape out)."""
        return self._apply(images, self.matrix, center_before=True)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the whitening: back to the space the ZCA was fitted in."""
        return self._apply(images, self.inverse_matrix, center_before=False)

    def _apply(self, images, matrix, center_before):
        d = self.mean.shape[0]
        if images.dim() < 3 or math.prod(images.shape[-3:]) != d:
            raise ValueError(f"images: expected [..., C, H, W] with C*H*W = {d}, got {tuple(images.shape)}")
        if images.device != self.mean.device:
            raise ValueError(f"images are on {images.device} but the ZCA is on {self.mean.device}")
        flat = images.reshape(-1, d).float()
        out = (flat - self.mean) @ matrix if center_before else flat @ matrix + self.mean
        return out.reshape(images.shape)

    def to(self, device) -> "ZCA":
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse_matrix.to(device), self.eps)


@dataclasses.dataclass(eq=False)
class Dataset:
    """Images and labels on one device, with the statistics that turned raw images into them.

    ``images`` ``[N, C, H, W]`` (float32 from ``load``) are ``zca((raw - mean) / std)`` (``zca`` optional) of raw
    images in [0, 1]; ``normalize`` / ``denormalize`` go between the two spaces (e.g. to write a
    distilled set as PNG). A distilled set shares its real training set's statistics::

        distilled = dataclasses.replace(splits.train, images=syn_images, labels=syn_labels, name="cifar10-dm")

    Construction checks shapes, dtypes, devices, finiteness and label range; ``validate=False``
    skips the value checks (they synchronise a GPU) for views of an already checked dataset.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]
    zca: ZCA | None = None
    classes: tuple[str, ...] | None = None  # class names, when the source has them
    validate: dataclasses.InitVar[bool] = True

    def __post_init__(self, validate: bool):
        _check_images(self.images, "images")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise TypeError(f"labels must be an int64 tensor [N], got {describe(self.labels)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels has {self.labels.shape[0]} entries but images has {self.images.shape[0]}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        channels = self.images.shape[1]
        for what, stat in (("mean", self.mean), ("std", self.std)):
            if not isinstance(stat, torch.Tensor) or stat.shape != (channels,):
                raise ValueError(f"{what} must be a tensor [C] = [{channels}], got {describe(stat)}")
        tensors = {"labels": self.labels, "mean": self.mean, "std": self.std}
        if self.zca is not None:
            tensors["zca"] = self.zca.mean
        for what, t in tensors.items():
            if t.device != self.images.device:
                raise ValueError(f"{what} is on {t.device} but images are on {self.images.device}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} names but num_classes is {self.num_classes}")
        if validate:
            _check_finite(self.images, "images")
            if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < self.num_classes):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got [{int(self.labels.min())}, {int(self.labels.max())}]"
                )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def to(self, device) -> "Dataset":
        zca = None if self.zca is None else self.zca.to(device)
        return dataclasses.replace(
            self,
            images=self.images.to(device),
            labels=self.labels.to(device),
            mean=self.mean.to(device),
            std=self.std.to(device),
            zca=zca,
            validate=False,
        )

    def class_indices(self, label: int) -> torch.Tensor:
        """Indices (int64, on the dataset's device, ascending) of the examples of class ``label``."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label must lie in [0, {self.num_classes}), got {label}")
        return torch.nonzero(self.labels == label).flatten()

    def subset(self, indices: torch.Tensor) -> "Dataset":
        """The examples at ``indices`` (an int64 index tensor or a boolean mask), same statistics."""
        indices = torch.as_tensor(indices, device=self.device)
        if indices.dtype not in (torch.int64, torch.bool):
            raise TypeError(f"indices must be int64 or bool, got {indices.dtype}")
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices], validate=False)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw images ``[..., C, H, W]`` in [0, 1] to this dataset's space (per-channel, then ZCA)."""
        out = (raw - self.mean[:, None, None]) / self.std[:, None, None]
        return out if self.zca is None else self.zca(out)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """This dataset's space back to raw [0, 1]-scaled images (not clamped)."""
        if self.zca is not None:
            images = self.zca.inverse(images)
        return images * self.std[:, None, None] + self.mean[:, None, None]


@dataclasses.dataclass
class DataSplits:
    """Train and test sets, and a validation set held out of train when one was asked for."""

    train: Dataset
    test: Dataset
    val: Dataset | None = None

    def to(self, device) -> "DataSplits":
        return DataSplits(self.train.to(device), self.test.to(device), None if self.val is None else self.val.to(device))


# ----------------------------------------------------------------------------------------------
# Building splits
# ----------------------------------------------------------------------------------------------


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.0,
    train_size: int | None = None,
    zca: bool = False,
    zca_eps: float = ZCA_EPS,
    seed: int = 0,
    **options,
) -> DataSplits:
    """Load dataset ``name`` onto ``device``, normalised with its training statistics.

    ``root`` (or ``$FASTMASK_DATA``) is the local folder of ``fashion-mnist`` / ``mnist`` /
    ``cifar10`` / ``cifar100`` / ``imagefolder`` (``fashion-mnist`` also looks in Debian's
    ``/usr/share/datasets/fashion-mnist`` when ``root`` is not given); ``digits`` and
    ``synthetic`` ignore it. ``options`` are per dataset: ``imagefolder``: ``size`` (default 32);
    ``synthetic``: ``shape`` (default (3, 32, 32)), ``num_classes`` (10), ``test_size`` (256).
    ``val_fraction`` of each training class is held out as ``val`` (stratified, by ``seed``).
    ``train_size`` keeps that many training examples (see ``from_tensors``); for ``synthetic`` it
    is the number of training images drawn (default 1024).

    Example::

        splits = load("cifar10", root="~/data", device="cuda", zca=True)
        splits.train.images.shape       # (50000, 3, 32, 32)
        small = load("fashion-mnist", train_size=6000, seed=1)    # 600 per class, from the Debian package
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    read, accepted = SOURCES[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"load({name!r}) got unknown option(s) {unknown}; it accepts {sorted(accepted)}")
    if name == "synthetic":
        options["seed"] = seed
        if train_size is not None:
            options["train_size"], train_size = train_size, None  # drawn at that size: nothing to subset
    if name not in ("digits", "synthetic"):
        options["root"] = root
    raw = read(**options)
    return from_tensors(
        raw.train_images,
        raw.train_labels,
        raw.test_images,
        raw.test_labels,
        num_classes=raw.num_classes,
        name=name,
        classes=raw.classes,
        device=device,
        val_fraction=val_fraction,
        train_size=train_size,
        zca=zca,
        zca_eps=zca_eps,
        seed=seed,
    )


def from_tensors(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    name: str = "custom",
    classes: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.0,
    train_size: int | None = None,
    zca: bool = False,
    zca_eps: float = ZCA_EPS,
    seed: int = 0,
) -> DataSplits:
    """Splits from raw tensors a user brings: images ``[N, C, H, W]`` floats (e.g. in [0, 1]), labels ``[N]``.

    Holds out ``val_fraction`` of every class of train (rounded per class, by ``seed``); then,
    with ``train_size``, keeps that many of the remaining training examples, drawn by ``seed``
    and stratified (each class keeps its share, rounded so the total is exact); normalises per
    channel with the kept training images' mean and std, then, with ``zca``, whitens with a ZCA
    fitted on the normalised training images. ``num_classes`` defaults to the largest label + 1.

    Example::

        splits = from_tensors(x_train, y_train, x_test, y_test, device="cuda", val_fraction=0.1)
    """
    for what, images in (("train_images", train_images), ("test_images", test_images)):
        _check_images(images, what)
        _check_finite(images, what)
    for what, labels, images in (("train_labels", train_labels, train_images), ("test_labels", test_labels, test_images)):
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
            raise TypeError(f"{what} must be an integer tensor [N], got {describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{what} has {labels.shape[0]} entries but its images have {images.shape[0]}")
        if labels.shape[0] == 0:
            raise ValueError(f"{what} is empty")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            "train_images and test_images differ in image shape: "
            f"{tuple(train_images.shape[1:])} vs {tuple(test_images.shape[1:])}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if train_size is not None and (not isinstance(train_size, int) or isinstance(train_size, bool) or train_size < 1):
        raise ValueError(f"train_size must be a positive int or None, got {train_size!r}")
    _check_seed(seed, "seed")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    classes = None if classes is None else tuple(classes)

    device = torch.device(device)
    train_images = train_images.to(device, torch.float32)
    test_images = test_images.to(device, torch.float32)
    train_labels = train_labels.to(device, torch.int64)
    test_labels = test_labels.to(device, torch.int64)

    val_images = val_labels = None
    if val_fraction > 0:
        held_out = torch.floor(torch.bincount(train_labels.cpu()).double() * val_fraction + 0.5)
        train_index, val_index = _stratified_split(train_labels.cpu(), held_out, seed)
        if len(val_index) == 0:
            raise ValueError(f"val_fraction={val_fraction} holds out no example of any class; raise it")
        train_index, val_index = train_index.to(device), val_index.to(device)
        val_images, val_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
    if train_size is not None:
        available = len(train_labels)
        if train_size > available:
            after = " left after the validation split" if val_fraction > 0 else ""
            raise ValueError(f"train_size={train_size} exceeds the {available} training examples{after}")
        _, keep = _stratified_split(train_labels.cpu(), _shares(torch.bincount(train_labels.cpu()), train_size), seed)
        keep = keep.to(device)
        train_images, train_labels = train_images[keep], train_labels[keep]
    if len(train_images) == 0:
        raise ValueError("train_images: no training images left to compute the normalisation statistics")

    # torch's reductions sum pairwise: float32 statistics agree with float64 ones to ~1e-8 here.
    var, mean = torch.var_mean(train_images, dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    # A constant channel carries no information; dividing it by 1 maps it to zero instead of NaN.
    std = torch.where(std > 0, std, torch.ones_like(std))

    def standardise(images):
        return torch.sub(images, mean[:, None, None]).div_(std[:, None, None])

    train_images, test_images = standardise(train_images), standardise(test_images)
    val_images = None if val_images is None else standardise(val_images)
    whitening = None
    if zca:
        whitening = ZCA.fit(train_images, eps=zca_eps)
        train_images, test_images = whitening(train_images), whitening(test_images)
        val_images = None if val_images is None else whitening(val_images)

    def make(images, labels):
        return Dataset(images, labels, num_classes, name, mean, std, whitening, classes)

    val = None if val_images is None else make(val_images, val_labels)
    return DataSplits(make(train_images, train_labels), make(test_images, test_labels), val)


def _stratified_split(labels: torch.Tensor, take: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, taken) index tensors (ascending): ``take[c]`` random examples of each class c are taken."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # Group by class, random within a class: a stable sort of a random permutation by label.
    order = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - starts[labels[order]]
    taken = rank_in_class < take.long()[labels[order]]
    return order[~taken].sort().values, order[taken].sort().values


def _shares(counts: torch.Tensor, total: int) -> torch.Tensor:
    """``total`` split over classes in proportion to ``counts`` (largest remainders: the sum is exact)."""
    exact = counts.double() * total / counts.sum()
    shares = exact.floor().long()
    by_remainder = torch.argsort(exact - shares, descending=True, stable=True)
    shares[by_remainder[: total - int(shares.sum())]] += 1
    return shares


# ----------------------------------------------------------------------------------------------
# Augmentation and batches
# ----------------------------------------------------------------------------------------------


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip with given parameters, for all images at once.

    ``images`` ``[..., C, H, W]``; ``dy``, ``dx`` (ints in [0, 2 * pad]) and ``flip`` (bool) have
    the leading shape ``[...]``. Image i becomes the ``H x W`` window at ``(dy[i], dx[i])`` of
    itself padded by ``pad`` zeros on every side, mirrored left-right where ``flip[i]``. Two
    gathers on the device, no loop over images. Zero is the mean pixel of normalised data.
    """
    if images.dim() < 3:
        raise ValueError(f"images must be [..., C, H, W], got {tuple(images.shape)}")
    lead, (channels, height, width) = images.shape[:-3], images.shape[-3:]
    for what, t in (("dy", dy), ("dx", dx), ("flip", flip)):
        if t.shape != lead:
            raise ValueError(f"{what} must have the leading shape {tuple(lead)} of images, got {tuple(t.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    flat = images.reshape(-1, channels, height, width)
    count, device = flat.shape[0], images.device
    padded = F.pad(flat, (pad, pad, pad, pad)) if pad else flat
    dy, dx, flip = dy.reshape(-1, 1).to(device), dx.reshape(-1, 1).to(device), flip.reshape(-1, 1).to(device)
    rows = dy + torch.arange(height, device=device)  # [count, H]
    columns = torch.arange(width, device=device)
    columns = torch.where(flip, width - 1 - columns, columns) + dx  # [count, W]: the flip is a reversed window
    padded_width = padded.shape[-1]
    out = padded.gather(2, rows[:, None, :, None].expand(count, channels, height, padded_width))
    out = out.gather(3, columns[:, None, None, :].expand(count, channels, height, width))
    return out.reshape(images.shape)


def augment_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and, with ``flip``, random horizontal flip of every image.

    ``images`` ``[B, C, H, W]`` or ``[K, B, C, H, W]`` (any leading dims); the parameters are
    drawn from ``generator`` (on its own device) and the images are transformed on theirs.

    Example::

        g = torch.Generator().manual_seed(0)
        augmented = augment_crop_flip(batch, g)     # same shape as batch
    """
    lead = images.shape[:-3]
    dy, dx, flips = _draw_crop_flip(lead, generator, pad, flip)
    return crop_flip(images, dy, dx, flips, pad)


def _draw_crop_flip(shape, generator, pad, flip):
    dy = torch.randint(0, 2 * pad + 1, shape, generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, shape, generator=generator, device=generator.device)
    if flip:
        flips = torch.randint(0, 2, shape, generator=generator, device=generator.device).bool()
    else:
        flips = torch.zeros(shape, dtype=torch.bool, device=generator.device)
    return dy, dx, flips


class Loader:
    """Shuffled (and augmented) mini-batches of ``dataset`` for one model or a stack of K.

    ``seeds`` is an int (one model: batches ``[B, C, H, W]``, ``[B]``) or a sequence of K ints
    (batches ``[K, B, C, H, W]``, ``[K, B]``). Model k's data order and augmentation in epoch e
    come from a CPU generator seeded by ``(seeds[k], e)`` alone: the same on every device, the
    same whatever the other models of the stack, and step t is reached without replaying the
    steps before it (``batch(t)`` is a pure function of the seeds and t). Each epoch is a
    permutation of the dataset; with ``drop_last`` its tail (``len % batch_size`` examples) is
    skipped, otherwise the epoch's last batch is smaller.

    Example::

        loader = Loader(splits.train, batch_size=128, seeds=[0, 1])
        for inputs, targets in loader.steps(start, total_steps):    # resumes at step ``start``
            ...
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seeds: int | Sequence[int],
        *,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        drop_last: bool = True,
    ):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a fastmask.data.Dataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > len(dataset):
            raise ValueError(f"batch_size {batch_size} exceeds the dataset's {len(dataset)} examples with drop_last=True")
        self.stacked = not isinstance(seeds, int)
        self.seeds = list(seeds) if self.stacked else [seeds]
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        for k, seed in enumerate(self.seeds):
            _check_seed(seed, f"seeds[{k}]" if self.stacked else "seeds")
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be a non-negative int, got {pad!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.augment = augment and (pad > 0 or flip)
        self.pad = pad
        self.flip = flip
        self.drop_last = drop_last
        n = len(dataset)
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._plan_epoch = None
        self._plan = None

    @property
    def num_models(self) -> int:
        return len(self.seeds)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of global step ``step`` (epoch ``step // steps_per_epoch``)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        epoch, position = divmod(step, self.steps_per_epoch)
        order, dy, dx, flips = self._epoch_plan(epoch)
        window = slice(position * self.batch_size, (position + 1) * self.batch_size)
        index = order[:, window]  # [K, B]
        inputs = self.dataset.images[index]
        targets = self.dataset.labels[index]
        if self.augment:
            inputs = crop_flip(inputs, dy[:, window], dx[:, window], flips[:, window], self.pad)
        if not self.stacked:
            return inputs[0], targets[0]
        return inputs, targets

    def steps(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of global steps ``start``, ..., ``stop - 1``."""
        for step in range(start, stop):
            yield self.batch(step)

    def _epoch_plan(self, epoch: int):
        """Per model: the epoch's permutation and every position's crop offsets and flip, on the device."""
        if self._plan_epoch != epoch:
            n, device = len(self.dataset), self.dataset.device
            orders, dys, dxs, flips = [], [], [], []
            for seed in self.seeds:
                generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
                orders.append(torch.randperm(n, generator=generator))
                if self.augment:
                    dy, dx, flip = _draw_crop_flip((n,), generator, self.pad, self.flip)
                    dys.append(dy)
                    dxs.append(dx)
                    flips.append(flip)
            stack = lambda ts: torch.stack(ts).to(device) if ts else None  # noqa: E731
            self._plan = (stack(orders), stack(dys), stack(dxs), stack(flips))
            self._plan_epoch = epoch
        return self._plan


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch), well mixed so nearby pairs give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_images(images, what: str):
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point or images.dim() != 4:
        raise TypeError(f"{what} must be a floating tensor [N, C, H, W], got {describe(images)}")


def _check_finite(images: torch.Tensor, what: str):
    # A NaN or Inf makes the sum NaN or Inf: one reduction, no [N, C, H, W] mask, for every image of a
    # large dataset. Only a sum that overflows goes on to the element-wise check.
    if not torch.isfinite(images.sum()) and not torch.isfinite(images).all():
        raise ValueError(f"{what} holds NaN or Inf")


def _check_seed(seed, what: str):
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{what} must be a non-negative int, got {seed!r}")
