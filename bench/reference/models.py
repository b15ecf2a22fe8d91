"""ConvNet-3 and CIFAR ResNet-10/18 as plain ``nn.Module``s, the way the papers' repositories write them.

The architectures, the order in which layers are created and their initialisation (torch's
defaults) are those of ``fastmask.models``, so that ``torch.manual_seed(s)`` followed by
``create(...)`` gives exactly the weights fastmask starts from. The modules are ordinary
``nn.Conv2d`` / ``nn.Linear``: masks come from ``torch.nn.utils.prune``.

Example::

    torch.manual_seed(0)
    model = create("convnet3", 10, (3, 32, 32))        # 320,010 parameters
    features = model.embed(torch.randn(8, 3, 32, 32))  # [8, 2048]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # GroupNorm with one group per channel: the distillation code's instance norm
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'instance', 'batch', 'layer' or 'none', got {kind!r}")


class ConvNet(nn.Module):
    """``depth`` blocks of conv 3x3 (padding 1) -> norm -> ReLU -> 2x2 average pool, then a linear layer."""

    def __init__(self, num_classes: int, in_shape=(3, 32, 32), width: int = 128, depth: int = 3,
                 norm: str = "instance"):
        super().__init__()
        channels, height, width_px = in_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), norm_layer(norm, width), nn.ReLU(inplace=True)]
            if height >= 2 and width_px >= 2:
                layers.append(nn.AvgPool2d(2, 2))
                height, width_px = height // 2, width_px // 2
            channels = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * height * width_px, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max pool); blocks (2, 2, 2, 2) is ResNet-18."""

    def __init__(self, num_classes: int, in_shape=(3, 32, 32), blocks=(2, 2, 2, 2), width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True)]
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2**stage
            for i in range(count):
                layers.append(BasicBlock(channels, out_channels, 2 if stage > 0 and i == 0 else 1))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


MODELS = {
    "convnet3": lambda classes, shape, **options: ConvNet(classes, shape, **options),
    "convnet": lambda classes, shape, **options: ConvNet(classes, shape, **options),
    "resnet10": lambda classes, shape, **options: ResNet(classes, shape, blocks=(1, 1, 1, 1), **options),
    "resnet18": lambda classes, shape, **options: ResNet(classes, shape, blocks=(2, 2, 2, 2), **options),
}


def create(name: str, num_classes: int, in_shape, **options) -> nn.Module:
    """Model ``name`` (``convnet3``, ``convnet``, ``resnet10``, ``resnet18``) for ``num_classes``
    classes and ``(C, H, W)`` inputs; ``options``: ``width``, ``depth``, ``norm`` (ConvNet), ``width`` (ResNet)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} in the reference pipeline, got {name!r}")
    return MODELS[name](num_classes, tuple(in_shape), **options)


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear (the output layer included, as open_lth prunes ConvNets and ResNets)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_shapes(model: nn.Module, in_shape, batch: int = 1) -> list[dict]:
    """What every Conv2d / Linear of ``model`` sees on a ``[batch, *in_shape]`` input: one dict per
    layer, in call order, with its name, module and input shape (for the per-layer benchmarks)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, inputs, out, name=name: seen.append(
        {"name": name, "module": m, "input_shape": tuple(inputs[0].shape)})) for name, m in prunable_modules(model)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, *in_shape))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen
