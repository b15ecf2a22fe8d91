"""Data the way the papers' code feeds it: CPU tensors, a ``torch.utils.data.DataLoader``, and a
per-sample transform (random crop with 4 pixels of zero padding, horizontal flip) written the way
torchvision's ``RandomCrop(32, padding=4)`` / ``RandomHorizontalFlip()`` work, drawn from torch's
global generator (seeded by ``torch.manual_seed`` at the start of a run; workers get their seeds
from the loader's generator). Batches are moved to the device one at a time.

Example::

    loader = train_loader(images, labels, batch_size=256, seed=0, augment=True)
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, targets, device)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class CropFlip:
    """Random crop of one ``[C, H, W]`` image from its ``pad``-zero-padded copy, then a horizontal
    flip with probability 1/2 (when ``flip``)."""

    def __init__(self, pad: int = 4, flip: bool = True):
        self.pad, self.flip = pad, flip

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        if self.pad:
            padded = F.pad(image, (self.pad, self.pad, self.pad, self.pad))
            top = int(torch.randint(0, 2 * self.pad + 1, (1,)))
            left = int(torch.randint(0, 2 * self.pad + 1, (1,)))
            image = padded[:, top:top + height, left:left + width]
        if self.flip and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return image


class TransformedTensorDataset(Dataset):
    """``TensorDataset`` of images and labels with a transform applied to each image as it is read."""

    def __init__(self, images: Tensor, labels: Tensor, transform=None):
        if len(images) != len(labels):
            raise ValueError(f"images holds {len(images)} examples but labels {len(labels)}")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (image if self.transform is None else self.transform(image)), self.labels[index]


def train_loader(images: Tensor, labels: Tensor, batch_size: int, seed: int, *, augment: bool = True,
                 flip: bool = True, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Shuffled batches of ``batch_size`` (the last, incomplete one dropped) of CPU tensors."""
    transform = CropFlip(4, flip) if augment else None
    return DataLoader(TransformedTensorDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def eval_loader(images: Tensor, labels: Tensor, batch_size: int = 1024, *, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """The examples in order, in batches of ``batch_size``."""
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory)


def to_device(inputs: Tensor, targets: Tensor, device: torch.device):
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled`` (fastmask's ``amp``), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode, restored after) over ``loader``."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, targets, device)
        with autocast(device, amp):
            logits = model(inputs)
        logits = logits.float()
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    return total_loss / count, correct / count
