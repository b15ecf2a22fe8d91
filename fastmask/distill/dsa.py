"""Gradient matching: DC (Zhao, Mopuri & Bilen 2021) and DSA (DC with differentiable siamese
augmentation, Zhao & Bilen 2021).

One iteration draws K fresh random networks (trained during the iteration) and repeats
``outer_loop`` times:

1. matching: for every network k and class c, the gradients of the mean cross-entropy of a
   real batch of class c and of the class's synthetic images (both under one DSA draw) with
   respect to the network's weights; per layer, the distance
   ``sum over output channels of (1 - cos(g_real, g_syn))`` (conv weights per output channel,
   linear weights per output row; biases and norm parameters count 0, as in the reference
   code); summed over layers and classes, averaged over the K networks; one SGD step on the
   images (lr 0.1, momentum 0.5);
2. then (except after the last matching step) ``inner_loop`` epochs of the networks on the
   synthetic set (batch 256, SGD lr 0.01, DSA with an independent draw per image).

Outer/inner loops default to the paper's table: (1, 1) at 1 image per class, (10, 50) at 10,
(20, 25) at 20, (30, 20) at 30, (40, 15) at 40, (50, 10) at 50; other counts must set them.

Per-class gradients in one pass: the reference code runs one backward per class. Here each
network's weights are repeated once per class (K x classes copies, a stack of that many
networks), copy (k, c) sees the batch of class c, and one backward of the summed per-copy
losses yields every copy's gradient, that is every (network, class) gradient, at once; the
synthetic gradients come the same way with ``create_graph=True`` so the distance can be
differentiated back to the images. Models with BatchNorm normalise each copy's batch alone
(the reference code instead freezes BatchNorm statistics from a mixed real batch).

``GradientMatcher`` holds this batched loss; ``GradientMatching`` (DC/DSA) and IDC
(``fastmask.distill.idc``: other matched layers, another distance) build on it.

Example::

    from fastmask.distill import distill
    syn = distill("dsa", splits.train, images_per_class=10)            # 1000 iterations, (10, 50) loops
    dc = distill("dc", splits.train, images_per_class=10)              # no augmentation
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fastmask.distill.base import Distiller, MatchingConfig, check_positive, redraw, train_stack
from fastmask.optim import MaskedSGD

# images per class -> (outer_loop, inner_loop), from the DC/DSA code.
PAPER_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclasses.dataclass
class DSAConfig(MatchingConfig):
    """DC/DSA's options (defaults: the papers' settings; ``augment=None`` is DC)."""

    iterations: int = 1000
    outer_loop: int | None = None  # None: PAPER_LOOPS[images_per_class]
    inner_loop: int | None = None
    lr: float = 0.1  # SGD on the images
    momentum: float = 0.5
    lr_net: float = 0.01  # SGD (no momentum) of the networks in the inner loop
    batch_train: int = 256  # the inner loop's batch

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "lr", "lr_net", "batch_train")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        for name in ("outer_loop", "inner_loop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (1 if name == "outer_loop" else 0)):
                raise ValueError(f"{name} must be None or an int >= {1 if name == 'outer_loop' else 0}, got {value!r}")

    def loops(self, images_per_class: int) -> tuple[int, int]:
        """(outer_loop, inner_loop): the configured ones, else the paper's for this many images per class."""
        if self.outer_loop is not None and self.inner_loop is not None:
            return self.outer_loop, self.inner_loop
        if images_per_class not in PAPER_LOOPS:
            raise ValueError(f"the paper defines outer/inner loops for {sorted(PAPER_LOOPS)} images per class; "
                             f"set outer_loop and inner_loop for images_per_class={images_per_class}")
        outer, inner = PAPER_LOOPS[images_per_class]
        return (self.outer_loop or outer), (inner if self.inner_loop is None else self.inner_loop)


def gradient_distance(real: Tensor, syn: Tensor) -> Tensor:
    """Sum over output channels (dim 1) of ``1 - cos`` between gradients ``[copies, out, ...]``,
    summed over copies (the reference's epsilon 1e-6 in the denominator)."""
    real, syn = real.flatten(2), syn.flatten(2)
    cosine = (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + 1e-6)
    return (1 - cosine).sum()


class GradientMatcher(Distiller):
    """The batched per-class gradient-matching loss that DC/DSA and IDC share (see the module
    docstring); a method sets ``image_optimizer`` and may override which parameters are matched
    (``matches``) and the per-layer distance (``distance``)."""

    image_optimizer: torch.optim.Optimizer

    def __init__(self, data, images_per_class, config: MatchingConfig, **options):
        super().__init__(data, images_per_class, config, **options)
        K, classes = self.num_networks, self.num_classes
        # copy k * classes + c of the replicated networks sees class c
        self.copy_labels = torch.arange(classes, device=data.device).repeat(K)

    @staticmethod
    def matches(stacked: Tensor) -> bool:
        """Whether a stacked parameter ``[K, ...]`` is matched: weights of two or more dimensions per model."""
        return stacked.dim() >= 3

    @staticmethod
    def distance(real: Tensor, syn: Tensor) -> Tensor:
        """The distance between the real and synthetic gradients ``[copies, ...]`` of one layer."""
        return gradient_distance(real, syn)

    def replicated(self) -> tuple[dict[str, Tensor], list[str]]:
        """Every parameter and buffer of the K networks repeated per class (``[K * classes, ...]``),
        detached, and the names of the matched ones (``matches``), which require grad so that
        gradients can be taken with respect to them."""
        K, classes = self.num_networks, self.num_classes
        tensors, matched = {}, []
        for name, t in [*self.networks.model.named_parameters(), *self.networks.model.named_buffers()]:
            if t.dim() == 0:
                tensors[name] = t
                continue
            copies = t.detach().unsqueeze(1).expand(K, classes, *t.shape[1:]).reshape(K * classes, *t.shape[1:])
            if isinstance(t, torch.nn.Parameter) and self.matches(t):
                copies.requires_grad_()
                matched.append(name)
            tensors[name] = copies
        if not matched:
            raise ValueError(f"method {self.method!r} matches no parameter of model {self.model_name!r}")
        return tensors, matched

    def _copy_gradients(self, tensors, matched, images: Tensor, create_graph: bool) -> tuple[Tensor, ...]:
        """Per copy, the gradient of its mean cross-entropy on its batch ``images`` ``[K*classes, n, ...]``."""
        logits = functional_call(self.networks.model, tensors, (images,))
        n = images.shape[1]
        targets = self.copy_labels[:, None].expand(-1, n)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(-1, n).mean(1)
        return torch.autograd.grad(losses.sum(), [tensors[name] for name in matched], create_graph=create_graph)

    def loss(self, real: Tensor, transform) -> Tensor:
        """The matching loss of the current images against ``real`` ``[K, classes, n, ...]`` under
        ``transform``, for the networks as they are."""
        if transform is not None:
            real = transform(real)
        tensors, matched = self.replicated()
        real_grads = self._copy_gradients(tensors, matched, real.flatten(0, 1), create_graph=False)
        syn_grads = self._copy_gradients(tensors, matched, self.synthetic_batch(transform).flatten(0, 1),
                                         create_graph=True)
        distance = sum(self.distance(r, s) for r, s in zip(real_grads, syn_grads))
        return distance / self.num_networks

    def match(self) -> Tensor:
        """One matching step and image update."""
        loss = self.loss(self.real_batch(), self.siamese())
        (self.images.grad,) = torch.autograd.grad(loss, [self.images])
        self.image_optimizer.step()
        return loss.detach()


class GradientMatching(GradientMatcher):
    method = "dsa"

    def __init__(self, data, images_per_class, config: DSAConfig = DSAConfig(), **options):
        super().__init__(data, images_per_class, config, **options)
        if config.augment is None:
            self.method = "dc"
        self.outer_loop, self.inner_loop = config.loops(images_per_class)
        self.image_optimizer = torch.optim.SGD([self.images], lr=config.lr, momentum=config.momentum)
        self.network_optimizer = MaskedSGD.from_model(self.networks, lr=config.lr_net)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "outer_loop": self.outer_loop, "inner_loop": self.inner_loop}

    def train_networks(self, epochs: int) -> None:
        """``epochs`` passes of each network over the synthetic set, each network its own order and
        augmentation (an independent draw per image), batches of ``batch_train``."""
        images = self.images.detach().flatten(0, 1)
        labels = torch.arange(self.num_classes, device=images.device).repeat_interleave(self.images_per_class)
        K, total = self.num_networks, images.shape[0]
        for _ in range(epochs):
            order = torch.rand(K, total, generator=self.generator, device=images.device).argsort(-1)
            train_stack(self.networks, self.network_optimizer, images, labels, order, self.config.batch_train,
                        self.augment)

    def step(self) -> Tensor:
        redraw(self.networks, self.generator)
        self.networks.train()
        total = 0
        for outer in range(self.outer_loop):
            total = total + self.match()
            if outer < self.outer_loop - 1:
                self.train_networks(self.inner_loop)
        return total / self.outer_loop
