"""Datasets as tensors on the training device, and K-model mini-batches with device-side augmentation.

Every dataset is a pair of float32 images ``[N, C, H, W]`` and int64 labels ``[N]`` that live on
the device that trains on them; nothing goes through a ``DataLoader`` during training.

- ``digits``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download),
  1 x 8 x 8, 1437 train / 360 test in a fixed stratified split. The default.
- ``fashion-mnist`` / ``mnist``: 1 x 28 x 28, 60,000 train / 10,000 test, from the four standard
  IDX files (gzipped or not) in ``root=``, ``$FASTMASK_DATA`` or, for Fashion-MNIST, the folder
  Debian's package ``dataset-fashion-mnist`` installs (``/usr/share/datasets/fashion-mnist``).
  Magic numbers, dimensions and counts are checked.
- ``cifar10`` / ``cifar100``: the standard python-format batch files (``cifar-10-batches-py`` /
  ``cifar-100-python``) from a local folder, ``root=`` or ``$FASTMASK_DATA``. The files are
  pickles; they are read with a restricted unpickler that builds only dicts, lists, bytes, ints
  and numpy arrays, so a crafted file cannot run code.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``) through
  torchvision (optional), resized and centre-cropped to ``size`` (ImageNet-10 style subsets).
- ``synthetic``: uniform random images of any shape and class count, for benchmarks and tests.

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
import gzip
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
DATA_ROOT_ENV = "FASTMASK_DATA"
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
            raise TypeError(f"labels must be an int64 tensor [N], got {_describe(self.labels)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels has {self.labels.shape[0]} entries but images has {self.images.shape[0]}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        channels = self.images.shape[1]
        for what, stat in (("mean", self.mean), ("std", self.std)):
            if not isinstance(stat, torch.Tensor) or stat.shape != (channels,):
                raise ValueError(f"{what} must be a tensor [C] = [{channels}], got {_describe(stat)}")
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
    if name not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    read, accepted = _SOURCES[name]
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
            raise TypeError(f"{what} must be an integer tensor [N], got {_describe(labels)}")
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
# Sources: raw images in [0, 1] and labels
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Raw:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] | None = None


DIGITS_TEST_SIZE = 360


def _digits() -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # Fixed, independent of the run's seed, so every run is scored on the same 360 test images.
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0
    )
    train_index, test_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(test_index))
    return _Raw(
        images[train_index], labels[train_index], images[test_index], labels[test_index], 10,
        tuple(str(name) for name in digits.target_names),
    )


def _synthetic(shape=(3, 32, 32), num_classes=10, train_size=1024, test_size=256, seed=0) -> _Raw:
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for what, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{what} must be a positive int, got {size!r}")
    generator = torch.Generator().manual_seed(seed)

    def draw(n):
        images = torch.rand((n, *shape), generator=generator)
        # Balanced classes (every class present once n >= num_classes), in random order.
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
        return images, labels

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    return _Raw(train_images, train_labels, test_images, test_labels, num_classes)


_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        archive="cifar-10-python.tar.gz",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        archive="cifar-100-python.tar.gz",
    ),
}
CIFAR_PIXELS = 3 * 32 * 32


def _cifar(name: str, root=None) -> _Raw:
    spec = _CIFAR[name]
    files = spec["train"] + spec["test"]
    how = f"extract {spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html"
    found = _find_files([_data_root(root, name)], (spec["folder"],), files, name, "the python-format batch files", how)
    folder = found[files[0]].parent

    def read(file_names):
        images, labels = [], []
        for file_name in file_names:
            x, y = _cifar_batch(folder / file_name, spec["label_key"], spec["num_classes"])
            images.append(x)
            labels.append(y)
        images = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
        return images.float().div_(255.0), torch.from_numpy(np.concatenate(labels))

    train_images, train_labels = read(spec["train"])
    test_images, test_labels = read(spec["test"])
    classes = None
    if (folder / spec["meta"]).is_file():
        classes = _cifar_names(folder / spec["meta"], spec["names_key"], spec["num_classes"])
    return _Raw(train_images, train_labels, test_images, test_labels, spec["num_classes"], classes)


def _imagefolder(root=None, size=32) -> _Raw:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from torch.utils.data import DataLoader

    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError(
            "the imagefolder dataset reads images through torchvision: pip install 'fastmask[vision]'"
        ) from exc
    base = _data_root(root, "imagefolder")
    train_dir = base / "train"
    test_dir = next((base / sub for sub in ("val", "test") if (base / sub).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise FileNotFoundError(
            f"imagefolder: expected {base}/train/<class>/<images> and {base}/val/<class>/<images> "
            f"(or test/ instead of val/); found {'no ' if not train_dir.is_dir() else ''}train/ and "
            f"{'no val/ or test/' if test_dir is None else test_dir.name + '/'}"
        )
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    train = datasets.ImageFolder(str(train_dir), transform=transform)
    test = datasets.ImageFolder(str(test_dir), transform=transform)
    if train.class_to_idx != test.class_to_idx:
        raise ValueError(f"imagefolder: {train_dir} and {test_dir} hold different class folders")

    def stack(folder):
        # Decoding and resizing full-size images is the slow part: worker processes share it.
        batches = DataLoader(folder, batch_size=256, num_workers=min(8, os.cpu_count() or 1))
        images, labels = zip(*batches)
        return torch.cat(images), torch.cat(labels).long()

    train_images, train_labels = stack(train)
    test_images, test_labels = stack(test)
    return _Raw(train_images, train_labels, test_images, test_labels, len(train.classes), tuple(train.classes))


IDX_FILES = {  # split: (images, labels), each file named so or with .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_COUNTS = {"train": 60000, "test": 10000}  # the same for MNIST and Fashion-MNIST
IDX_SIDE = 28
FASHION_MNIST_SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_IDX = {
    "mnist": dict(
        folders=("mnist", "MNIST/raw"),  # root/mnist, or torchvision's download folder
        classes=tuple(str(digit) for digit in range(10)),
        system_folder=None,
        how="the four files of http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": dict(
        folders=("fashion-mnist", "FashionMNIST/raw"),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        system_folder=FASHION_MNIST_SYSTEM_FOLDER,
        how=f"apt-get install dataset-fashion-mnist puts them in {FASHION_MNIST_SYSTEM_FOLDER}; or pass root= "
        "(or set $FASTMASK_DATA) to a folder holding those of https://github.com/zalandoresearch/fashion-mnist",
    ),
}


def _idx_dataset(name: str, root=None) -> _Raw:
    spec = _IDX[name]
    system_folder = spec["system_folder"]
    roots = []
    if root is not None or os.environ.get(DATA_ROOT_ENV) or system_folder is None:
        roots.append(_data_root(root, name))  # raises when there is no folder to look in
    if root is None and system_folder is not None:  # a folder named by the caller is the only place looked in
        roots.append(system_folder)
    files = [file for pair in IDX_FILES.values() for file in pair]
    found = _find_files(roots, spec["folders"], files, name, "the IDX files", spec["how"], suffixes=("", ".gz"))

    def read(split):
        images_file, labels_file = (found[f] for f in IDX_FILES[split])
        count, side = IDX_COUNTS[split], IDX_SIDE
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.shape != (count, side, side):
            raise ValueError(f"{images_file}: expected {count} images of {side} x {side} ({split} split of {name}), "
                             f"got dimensions {' x '.join(map(str, images.shape))}")
        if labels.shape != (count,):
            raise ValueError(f"{labels_file}: expected {count} labels ({split} split of {name}), got dimensions "
                             f"{' x '.join(map(str, labels.shape))}")
        if labels.max() >= len(spec["classes"]):
            raise ValueError(f"{labels_file}: labels must lie in [0, {len(spec['classes'])}), got up to {labels.max()}")
        # One conversion of the whole array (a copy: the file's bytes are read-only), no loop over images.
        pixels = torch.from_numpy(images.reshape(count, 1, side, side).astype(np.float32)).div_(255.0)
        return pixels, torch.from_numpy(labels.astype(np.int64))

    train_images, train_labels = read("train")
    test_images, test_labels = read("test")
    return _Raw(train_images, train_labels, test_images, test_labels, len(spec["classes"]), spec["classes"])


_SOURCES = {
    "digits": (_digits, ()),
    "fashion-mnist": (lambda root: _idx_dataset("fashion-mnist", root), ()),
    "mnist": (lambda root: _idx_dataset("mnist", root), ()),
    "cifar10": (lambda root: _cifar("cifar10", root), ()),
    "cifar100": (lambda root: _cifar("cifar100", root), ()),
    "imagefolder": (_imagefolder, ("size",)),
    "synthetic": (_synthetic, ("shape", "num_classes", "train_size", "test_size")),
}


def _data_root(root, name: str) -> Path:
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is None:
        raise FileNotFoundError(f"{name} is read from a local folder: pass root=... or set ${DATA_ROOT_ENV}")
    return Path(root).expanduser()


def _find_files(roots: list[Path], subfolders: Sequence[str], files: list[str], name: str, what: str, how: str,
                suffixes: Sequence[str] = ("",)) -> dict[str, Path]:
    """The path of each of ``files`` (named so, or with one of ``suffixes``) in the first folder that
    holds them all, trying each root itself, then its ``subfolders``; else a FileNotFoundError that
    says, for each root, what is missing where."""

    def locate(folder: Path, file: str) -> Path | None:
        return next((folder / (file + s) for s in suffixes if (folder / (file + s)).is_file()), None)

    for root in roots:
        for folder in (root, *(root / sub for sub in subfolders)):
            paths = {file: locate(folder, file) for file in files}
            if all(paths.values()):
                return paths
    places, reasons = [], []
    for root in roots:
        places.append(" or in ".join(str(folder) for folder in (root, *(root / sub for sub in subfolders))))
        if not root.is_dir():
            reasons.append(f"{root} does not exist or is not a folder")
            continue
        where = next((root / sub for sub in subfolders if (root / sub).is_dir()), root)
        missing = [file for file in files if locate(where, file) is None]
        reasons.append(f"{where} lacks {', '.join(missing)}")
    spelled = ", ".join(file + ("[.gz]" if ".gz" in suffixes else "") for file in files)
    raise FileNotFoundError(
        f"{name}: expected {what} {spelled} in {', or '.join(places)} ({how}); {'; '.join(reasons)}"
    )


# ----------------------------------------------------------------------------------------------
# The IDX reader (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------

IDX_UNSIGNED_BYTE = 0x08  # the element type code of the MNIST-style files, the only one read


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gunzipped first when its name ends in ``.gz``).

    The format: a big-endian magic number ``0x000008NN`` (type code 0x08: unsigned bytes; NN the
    number of dimensions), NN big-endian uint32 sizes, then the bytes in row-major order. Returns a
    read-only uint8 array of those sizes (a view of the file's bytes, no copy). Raises
    ``ValueError`` naming the file when it is not such a file: a wrong magic number, a header
    or data shorter than it says (truncated), or bytes after the data.

    Example::

        images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # (10000, 28, 28)
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        try:
            payload = gzip.decompress(path.read_bytes())
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # EOFError: a truncated archive
            raise ValueError(f"{path}: not a readable gzip file ({type(exc).__name__}: {exc})") from exc
    else:
        payload = path.read_bytes()
    if len(payload) < 4:
        raise ValueError(f"{path}: truncated: {len(payload)} bytes, shorter than an IDX magic number")
    magic = int.from_bytes(payload[:4], "big")
    dims = payload[3]
    if payload[:2] != b"\0\0" or payload[2] != IDX_UNSIGNED_BYTE or dims == 0:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes: magic number 0x{magic:08X}, expected "
                         f"0x0000{IDX_UNSIGNED_BYTE:02X}NN, NN the number of dimensions (0x00000803 for images, "
                         "0x00000801 for labels)")
    header = 4 + 4 * dims
    if len(payload) < header:
        raise ValueError(f"{path}: truncated: the header of {dims} dimensions needs {header} bytes, the file has "
                         f"{len(payload)}")
    shape = tuple(int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    size = math.prod(shape)
    stored = len(payload) - header
    if stored != size:
        state = "truncated" if stored < size else "malformed"
        raise ValueError(f"{path}: {state}: dimensions {' x '.join(map(str, shape))} need {size} bytes of data, "
                         f"the file holds {stored}")
    return np.frombuffer(payload, np.uint8, count=size, offset=header).reshape(shape)


# ----------------------------------------------------------------------------------------------
# The restricted CIFAR reader
# ----------------------------------------------------------------------------------------------


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for bytes; latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(
            f"_codecs.encode is only accepted on str with 'latin1', got {type(text).__name__}, {encoding!r}"
        )
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """The callables a pickled uint8 numpy array needs, under every module path numpy has used."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]  # protocols 0-4
    frombuffer = probe.__reduce_ex__(5)[0]  # protocol 5
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x (the CIFAR files) and numpy 2.x
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, bytes, str, numbers and numpy arrays; refuses every other global.

    Code runs from a pickle only through the globals it names (REDUCE, BUILD, INST, OBJ, NEWOBJ
    all start from one), so answering ``find_class`` from a closed table of numpy's array
    constructors stops a crafted file from calling anything else.
    """

    def __init__(self, file, path):
        # encoding="bytes": the CIFAR files are Python 2 pickles whose str values are raw bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"{self._path}: refused to load the global {module}.{name}: a CIFAR batch file holds only "
                f"dicts, lists, bytes and numpy arrays (a crafted pickle calls functions this way)"
            ) from None

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self._path}: refused a persistent id: CIFAR batch files have none")


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """Read one python-format CIFAR file (a batch or the meta file) with the restricted unpickler.

    Returns its dict with str keys. Raises ``pickle.UnpicklingError`` naming the file and the
    global when the file asks for anything but numpy arrays, and ``ValueError`` when it is not a
    readable pickle of a dict.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            payload = _RestrictedUnpickler(file, path).load()
    except _RefusedGlobal:
        raise
    except Exception as exc:  # a truncated or corrupt file fails in many ways; all mean "malformed"
        raise ValueError(f"{path}: not a readable python-format CIFAR file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(payload).__name__}")
    try:
        return {key.decode("ascii") if isinstance(key, bytes) else key: value for key, value in payload.items()}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: a key is not ASCII ({exc})") from exc


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    payload = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in payload:
            raise ValueError(f"{path}: no {key!r} entry (found {sorted(map(str, payload))})")
    data = payload["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise ValueError(f"{path}: 'data' must be a uint8 array [N, {CIFAR_PIXELS}], got {_describe(data)}")
    labels = payload[label_key]
    if isinstance(labels, np.ndarray):
        integral = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        integral = isinstance(labels, list) and all(type(label) is int for label in labels)
    if not integral:
        raise ValueError(f"{path}: {label_key!r} must be a list of ints, got {_describe(labels)}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return data, labels


def _cifar_names(path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    names = read_cifar_pickle(path).get(key)
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"{path}: {key!r} must be a list of {num_classes} names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


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


def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _check_images(images, what: str):
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point or images.dim() != 4:
        raise TypeError(f"{what} must be a floating tensor [N, C, H, W], got {_describe(images)}")


def _check_finite(images: torch.Tensor, what: str):
    # A NaN or Inf makes the sum NaN or Inf: one reduction, no [N, C, H, W] mask, for every image of a
    # large dataset. Only a sum that overflows goes on to the element-wise check.
    if not torch.isfinite(images.sum()) and not torch.isfinite(images).all():
        raise ValueError(f"{what} holds NaN or Inf")


def _check_seed(seed, what: str):
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{what} must be a non-negative int, got {seed!r}")
