"""The field's research models, built from masked modules.

``create(name, num_classes, in_shape)`` returns one of: ``convnet3`` (the distillation standard:
three blocks of conv 3x3 -> norm -> ReLU -> 2x2 average pool, width 128, instance norm),
``convnet`` (any depth/width/norm), ``resnet10`` / ``resnet18`` (CIFAR stem: 3x3 conv, no max
pool), ``vgg11`` / ``vgg16`` (batch norm, CIFAR head), ``lenet300_100`` and ``mlp``.

Every Conv2d / Linear is a ``fastmask.nn`` masked module. Which weights are prunable is a
property of the model, ``model.prunable`` (parameter names): conv and linear weights, without
the output layer when ``prune_output=False`` (open_lth leaves VGG's output layer dense).
Layers are modules (ReLU, pooling, Flatten) rather than functional calls where their shape
handling matters, so that ``fastmask.stack`` can run K copies of any of these models at once.

Example::

    model = fastmask.models.create("convnet3", num_classes=10, in_shape=(3, 32, 32))
    logits = model(torch.randn(8, 3, 32, 32))
    features = model.embed(torch.randn(8, 3, 32, 32))   # [8, 2048], used by distribution matching
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastmask.nn import AvgPool2d, MaskedConv2d, MaskedLinear, is_masked


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # instance norm with affine parameters, as the distillation code defines it
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'instance', 'batch', 'layer' or 'none', got {kind!r}")


class Classifier(nn.Module):
    """``features`` (a module that ends in flat features) followed by a linear ``head``."""

    def __init__(self, features: nn.Module, head: nn.Module, prune_output: bool = True):
        super().__init__()
        self.features = features
        self.head = head
        self.prunable = [f"{name}.weight" for name, m in self.named_modules() if is_masked(m)
                         and (prune_output or m is not head)]

    def embed(self, x: Tensor) -> Tensor:
        """The flattened features before the output layer."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def convnet(num_classes: int, in_shape=(3, 32, 32), width: int = 128, depth: int = 3, norm: str = "instance") -> Classifier:
    """ConvNet-D (Gidaris & Komodakis; the DC/DSA/DM/MTT/IDC standard): D blocks of
    conv(3x3, pad 1) -> norm -> ReLU -> avgpool(2), then one linear layer."""
    channels, height, width_px = in_shape
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [MaskedConv2d(channels, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True)]
        if height >= 2 and width_px >= 2:
            layers.append(AvgPool2d(2, 2))
            height, width_px = height // 2, width_px // 2
        channels = width
    layers.append(nn.Flatten())
    return Classifier(nn.Sequential(*layers), MaskedLinear(width * height * width_px, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = MaskedConv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = MaskedConv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(MaskedConv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet(num_classes: int, in_shape=(3, 32, 32), blocks=(2, 2, 2, 2), width: int = 64) -> Classifier:
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max pool): blocks (2,2,2,2) is ResNet-18."""
    layers: list[nn.Module] = [MaskedConv2d(in_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    channels = width
    for stage, count in enumerate(blocks):
        out_channels = width * 2**stage
        for i in range(count):
            layers.append(BasicBlock(channels, out_channels, 2 if stage > 0 and i == 0 else 1))
            channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), MaskedLinear(channels, num_classes))


VGG_LAYERS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


def vgg(num_classes: int, in_shape=(3, 32, 32), name: str = "vgg16") -> Classifier:
    """VGG for CIFAR (open_lth): conv 3x3 -> BN -> ReLU, max pools, global average pool, one linear
    layer; the output layer is not pruned. Pools that would shrink the map below 1x1 are skipped."""
    channels, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = []
    for item in VGG_LAYERS[name]:
        if item == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            continue
        layers += [MaskedConv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), MaskedLinear(channels, num_classes), prune_output=False)


def mlp(num_classes: int, in_shape=(1, 28, 28), hidden=(300, 100)) -> Classifier:
    """Fully connected ReLU network on flattened inputs; hidden (300, 100) is LeNet-300-100."""
    features: list[nn.Module] = [nn.Flatten()]
    size = 1
    for dim in in_shape:
        size *= dim
    for width in hidden:
        features += [MaskedLinear(size, width), nn.ReLU(inplace=True)]
        size = width
    return Classifier(nn.Sequential(*features), MaskedLinear(size, num_classes))


MODELS = {
    "convnet3": lambda c, s, **kw: convnet(c, s, **kw),
    "convnet": lambda c, s, **kw: convnet(c, s, **kw),
    "resnet10": lambda c, s, **kw: resnet(c, s, blocks=(1, 1, 1, 1), **kw),
    "resnet18": lambda c, s, **kw: resnet(c, s, blocks=(2, 2, 2, 2), **kw),
    "vgg11": lambda c, s, **kw: vgg(c, s, name="vgg11", **kw),
    "vgg16": lambda c, s, **kw: vgg(c, s, name="vgg16", **kw),
    "lenet300_100": lambda c, s, **kw: mlp(c, s, hidden=(300, 100), **kw),
    "mlp": lambda c, s, **kw: mlp(c, s, **kw),
}


def create(name: str, num_classes: int, in_shape, **options) -> Classifier:
    """Build model ``name`` for ``num_classes`` classes and inputs of shape ``in_shape`` (C, H, W).

    ``options`` go to the family's builder (``convnet``: width, depth, norm; ``resnet``: width;
    ``mlp``: hidden). Example: ``create("convnet3", 10, (1, 8, 8), norm="batch")``.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    in_shape = tuple(in_shape)
    if len(in_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}")
    return MODELS[name](num_classes, in_shape, **options)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable weights of ``model``: its ``prunable`` names if it declares them, else the
    weights of every Conv2d / Linear (biases and normalisation parameters never)."""
    params = dict(model.named_parameters())
    names = getattr(model, "prunable", None)
    if names is None:
        names = [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {name: params[name] for name in names}
