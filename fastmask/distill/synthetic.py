"""A synthetic (distilled) training set: images, labels, and how they were made.

The images live in the normalised space of the real training set they were distilled from (the
space a network trained on that dataset sees: per-channel standardised, then ZCA-whitened if the
source was), so a ``SyntheticSet`` carries the source's mean, std and ZCA to turn itself back
into a ``fastmask.data.Dataset`` (``as_dataset``) or into viewable pixels (``save_grid``).

One safetensors file holds everything (``save`` / ``SyntheticSet.load``): the tensors, and the
rest (method, images per class, hyperparameters, source name, class names, seconds) as a JSON
string under the metadata key ``"fastmask.synthetic"``.

Example::

    syn = fastmask.distill.distill("dm", splits.train, images_per_class=10)
    syn.save("run/distilled.safetensors")
    syn.save_grid("run/plots/distilled.png")
    same = SyntheticSet.load("run/distilled.safetensors", device="cuda")
    train_set = same.as_dataset()          # a fastmask.data.Dataset, for fastmask.train.fit
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastmask import io
from fastmask.data import ZCA, Dataset

METADATA_KEY = "fastmask.synthetic"
FORMAT_VERSION = 1


@dataclasses.dataclass(eq=False)
class SyntheticSet:
    """Images ``[N, C, H, W]`` (the source's normalised space) and int64 labels ``[N]``, class by
    class (``images_per_class`` of class 0, then of class 1, ...), with their provenance."""

    images: Tensor
    labels: Tensor
    num_classes: int
    method: str  # "dm", "dsa", "dc", "random", ...
    images_per_class: int
    source: str  # the name of the real dataset
    mean: Tensor  # [C], the source's normalisation
    std: Tensor  # [C]
    zca: ZCA | None = None
    classes: tuple[str, ...] | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-serialisable
    seconds: float = 0.0  # wall time of the distillation

    def __post_init__(self):
        # Dataset's checks (shapes, dtypes, devices, finiteness, label range) are the ones a set needs.
        self.as_dataset()
        if not isinstance(self.images_per_class, int) or self.images_per_class < 1:
            raise ValueError(f"images_per_class must be a positive int, got {self.images_per_class!r}")
        if len(self.labels) != self.num_classes * self.images_per_class:
            raise ValueError(f"labels holds {len(self.labels)} entries but num_classes x images_per_class is "
                             f"{self.num_classes} x {self.images_per_class}")
        try:
            json.dumps(self.hyperparameters)
        except TypeError as exc:
            raise TypeError(f"hyperparameters must be JSON-serialisable: {exc}") from None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:  # the provenance, never the images
        return (f"SyntheticSet({self.method} of {self.source}: {len(self)} images {list(self.images.shape[1:])}, "
                f"{self.images_per_class} per class, {self.num_classes} classes, {self.seconds:.1f} s, "
                f"zca={self.zca is not None}, device {self.device})")

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> "SyntheticSet":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device),
                                   mean=self.mean.to(device), std=self.std.to(device),
                                   zca=None if self.zca is None else self.zca.to(device))

    def as_dataset(self) -> Dataset:
        """The set as a ``fastmask.data.Dataset`` with the source's statistics (for ``fit``)."""
        return Dataset(self.images.detach(), self.labels, self.num_classes, f"{self.source}-{self.method}",
                       self.mean, self.std, self.zca, self.classes)

    def _info(self) -> dict:
        return {"format": FORMAT_VERSION, "num_classes": self.num_classes, "method": self.method,
                "images_per_class": self.images_per_class, "source": self.source,
                "classes": None if self.classes is None else list(self.classes),
                "hyperparameters": self.hyperparameters, "seconds": self.seconds,
                "zca_eps": None if self.zca is None else self.zca.eps}

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically)."""
        tensors = {"images": self.images, "labels": self.labels, "mean": self.mean, "std": self.std}
        if self.zca is not None:
            tensors.update(zca_mean=self.zca.mean, zca_matrix=self.zca.matrix,
                           zca_inverse_matrix=self.zca.inverse_matrix)
        io.save_tensors(path, tensors, metadata={METADATA_KEY: json.dumps(self._info())})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SyntheticSet":
        """Read a file written by ``save`` onto ``device``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path}: not a synthetic set file (no {METADATA_KEY!r} metadata)")
        info = json.loads(metadata[METADATA_KEY])
        if info.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: synthetic set format {info.get('format')!r}, expected {FORMAT_VERSION}")
        tensors = io.load_tensors(path, device)
        zca = None
        if info["zca_eps"] is not None:
            zca = ZCA(tensors["zca_mean"], tensors["zca_matrix"], tensors["zca_inverse_matrix"], info["zca_eps"])
        return cls(tensors["images"], tensors["labels"], info["num_classes"], info["method"],
                   info["images_per_class"], info["source"], tensors["mean"], tensors["std"], zca,
                   None if info["classes"] is None else tuple(info["classes"]), info["hyperparameters"],
                   info["seconds"])

    def pixels(self) -> Tensor:
        """The images as raw pixels in [0, 1] (denormalised, clipped), on the CPU."""
        return self.as_dataset().denormalize(self.images.detach()).clamp(0, 1).cpu()

    def save_grid(self, path: str | os.PathLike, max_per_class: int = 20) -> None:
        """A PNG of the images (raw pixels: denormalised, clipped to [0, 1]), one row per class (at most
        ``max_per_class`` columns), written atomically. Three channels are drawn as RGB, others in grey."""
        from matplotlib.figure import Figure

        pixels = self.pixels().numpy()
        channels, height, width = pixels.shape[1:]
        columns = min(self.images_per_class, max_per_class)
        gap = max(1, height // 8)
        grid = np.ones((self.num_classes * (height + gap) - gap, columns * (width + gap) - gap, channels))
        for c in range(self.num_classes):
            top = c * (height + gap)
            for j in range(columns):
                left = j * (width + gap)
                grid[top:top + height, left:left + width] = pixels[c * self.images_per_class + j].transpose(1, 2, 0)
        inches = 0.5
        figure = Figure(figsize=(max(2.0, columns * inches + 1), max(2.0, self.num_classes * inches + 0.6)))
        axes = figure.add_subplot()
        if channels == 3:
            axes.imshow(grid, interpolation="nearest")
        else:  # one channel, or a count no colour map fits: the channels' mean in grey
            axes.imshow(grid.mean(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        names = self.classes or [str(c) for c in range(self.num_classes)]
        axes.set_yticks([c * (height + gap) + height / 2 - 0.5 for c in range(self.num_classes)], names)
        axes.set_xticks([])
        axes.set_title(f"{self.source} {self.method}, {self.images_per_class} per class", fontsize=9)
        figure.tight_layout()
        # A tight box: class names longer than the margin tight_layout left are not clipped.
        io.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def random_real(data: Dataset, images_per_class: int, seed: int = 0) -> SyntheticSet:
    """``images_per_class`` real images of every class, drawn without replacement by ``seed``:
    the "random real" baseline of the distillation papers and the ``init="real"`` of the methods.

    Example::

        baseline = random_real(splits.train, 10, seed=0)     # method "random"
    """
    _check_data(data)
    _check_images_per_class(images_per_class, data)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(data.num_classes):
        members = data.class_indices(c).cpu()
        picked.append(members[torch.randperm(len(members), generator=generator)[:images_per_class]])
    index = torch.cat(picked).to(data.device)
    return SyntheticSet(data.images[index].clone(), data.labels[index].clone(), data.num_classes, "random",
                        images_per_class, data.name, data.mean, data.std, data.zca, data.classes,
                        {"seed": seed})


def _check_data(data) -> None:
    if not isinstance(data, Dataset):
        hint = " (pass the training split, e.g. splits.train)" if hasattr(data, "train") else ""
        raise TypeError(f"data must be a fastmask.data.Dataset{hint}, got {type(data).__name__}")


def _check_images_per_class(images_per_class, data: Dataset) -> None:
    if not isinstance(images_per_class, int) or isinstance(images_per_class, bool) or images_per_class < 1:
        raise ValueError(f"images_per_class must be a positive int, got {images_per_class!r}")
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    smallest = int(counts.min())
    if smallest < images_per_class:
        raise ValueError(f"images_per_class={images_per_class} but class {int(counts.argmin())} of data has only "
                         f"{smallest} images")
