"""Distribution matching (DM, Zhao & Bilen 2023).

Each iteration draws K frozen random networks and, for every class c and network k, compares
the mean embedding (``model.embed``: the features before the output layer) of a batch of real
images of class c with that of the class's synthetic images, both under the same DSA draw:

    loss = (1 / K) * sum_k sum_c || mean embed_k(aug(real_c)) - mean embed_k(aug(syn_c)) ||^2

then takes one SGD step on the images (lr 1, momentum 0.5; the paper runs 20,000 iterations).
With K = 1 this is the paper's loss; averaging over the K networks keeps the learning rate's
meaning for K > 1.

The reference code runs one network and one class per forward pass. Here the real images of
all classes and all K networks go through the stacked networks in one forward (without a
graph: their embeddings are constants), the synthetic images of all classes in a second one,
and the per-class means are views of the stacked embeddings, since every class has the same
number of images in a batch.

Models with BatchNorm see all classes of a batch in one normalisation (the default ConvNet-3
has instance norm, which is per image, so batching changes nothing there).

Example::

    from fastmask.distill import distill
    syn = distill("dm", splits.train, images_per_class=10, iterations=20000, num_networks=4)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from fastmask.distill.base import Distiller, MatchingConfig, check_positive, redraw


@dataclasses.dataclass
class DMConfig(MatchingConfig):
    """DM's options (defaults: the paper's CIFAR settings)."""

    iterations: int = 20000
    lr: float = 1.0  # SGD on the images
    momentum: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "lr")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")


class DistributionMatching(Distiller):
    method = "dm"

    def __init__(self, data, images_per_class, config: DMConfig = DMConfig(), **options):
        super().__init__(data, images_per_class, config, **options)
        self.networks.requires_grad_(False)  # frozen: gradients flow to the images only
        self.optimizer = torch.optim.SGD([self.images], lr=config.lr, momentum=config.momentum)

    def embeddings(self, images: Tensor) -> Tensor:
        """``[K, classes, n, C, H, W]`` -> per network and class, the mean embedding ``[K, classes, D]``."""
        K, classes, n = images.shape[:3]
        features = self.networks.embed(images.reshape(K, classes * n, *images.shape[3:]))
        return features.view(K, classes, n, -1).mean(2)

    def loss(self, real: Tensor, transform) -> Tensor:
        """The DM loss of the current images against ``real`` under ``transform`` (already redrawn networks)."""
        if transform is not None:
            real = transform(real)
        with torch.no_grad():
            real_mean = self.embeddings(real)
        syn_mean = self.embeddings(self.synthetic_batch(transform))
        return (real_mean - syn_mean).pow(2).sum() / self.num_networks

    def step(self) -> Tensor:
        redraw(self.networks, self.generator)
        loss = self.loss(self.real_batch(), self.siamese())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
