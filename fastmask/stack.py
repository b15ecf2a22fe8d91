"""K models of one architecture held and run as one: stacked weights, masks and norm statistics.

``Stack(models)`` copies K models of one architecture into one module whose layers hold
``[K, ...]`` parameters: masked conv / linear layers run the stacked kernels (one launch for
all K), BatchNorm keeps per-model running statistics, GroupNorm per-model affine parameters,
and shape-agnostic layers (ReLU, pooling, Flatten, Dropout) run on the K batches merged. The
models' own ``forward`` code (residual blocks, ``embed``) runs unchanged on ``[K, B, ...]``
tensors, so any model built from these layers stacks.

Example::

    models = [fastmask.models.create("convnet3", 10, (3, 32, 32)) for _ in range(4)]
    stack = Stack(models)
    logits = stack(torch.randn(4, 64, 3, 32, 32))               # [4, 64, 10]: a batch per model
    logits = stack(torch.randn(64, 3, 32, 32), shared=True)     # one batch seen by all 4
    trained = stack.split()                                      # back to 4 ordinary models

Every stacked layer holds its K models' tensors under the names of the layer it stacks
(``weight``, ``bias``, ``running_mean``, ...) and can hold others: ``stacked_tensors`` gives them,
``load_stacked`` replaces them, with any number of models. That is how K combinations of the models
(``fastmask.combinations``: the alphas of linear mode connectivity, the points of a loss
landscape) run as one stack. ``interpolate_in_kernel`` turns a stack of two models into the
networks on the segment between them, formed inside the conv and linear kernels.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmask import ops
from fastmask.nn import MaskedConv2d, MaskedLinear, is_masked, sparsify


def _stacked(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach() for t in tensors]).clone()


def _padded(layer: nn.Module, x: Tensor) -> tuple[Tensor, object]:
    """A stacked conv's input ``[K, B, ...]`` and padding: as nn.Conv2d does for padding modes other
    than zeros, padded explicitly, then convolved unpadded."""
    if layer.padding_mode == "zeros":
        return x, layer.padding
    K, B = x.shape[:2]
    x = F.pad(x.flatten(0, 1), layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return x.view(K, B, *x.shape[1:]), 0


class StackedLayer(nn.Module):
    """What every stacked layer shares: the tensors of its K models, ``[K, ...]`` each."""

    def stacked_tensors(self) -> dict[str, Tensor]:
        """The floating tensors ``[K, ...]`` that make the layer's K models, by name: its parameters
        and floating buffers (not its mask, nor counters such as ``num_batches_tracked``)."""
        tensors = {name: p.detach() for name, p in self.named_parameters(recurse=False)}
        tensors.update((name, b) for name, b in self.named_buffers(recurse=False) if b.is_floating_point())
        return tensors

    def load_stacked(self, tensors: Mapping[str, Tensor]) -> None:
        """Hold ``tensors`` (by name: those of ``stacked_tensors``, or ``mask``) instead of the current
        ones, as they are (not copied): the layer then runs as many models as their leading
        dimension (a mask ``[1, ...]`` is shared by all). Parameters given this way do not require
        gradients: the K models are for evaluation."""
        for name, tensor in tensors.items():
            if name in self._parameters:
                setattr(self, name, nn.Parameter(tensor, requires_grad=False))
            elif name in self._buffers:
                setattr(self, name, tensor)
            else:
                raise KeyError(f"{type(self).__name__} holds no tensor {name!r}")


def _unstack_masked(stacked: StackedLayer, k: int, layer: nn.Module) -> None:
    """Model k's weight, bias and mask of a stacked masked conv / linear into ``layer``. A plain
    layer whose mask in the stack prunes something is made masked first (``sparsify``): otherwise
    a stack of plain models pruned after stacking would split into unpruned models."""
    layer.weight.data.copy_(stacked.weight[k])
    if stacked.bias is not None:
        layer.bias.data.copy_(stacked.bias[k])
    if not is_masked(layer):
        if bool(stacked.mask.all()):  # pruned in no model: every split model keeps its plain layer
            return
        sparsify(layer)  # pruned in some model: every split model gets the masked layer (one architecture)
    layer.mask.copy_(stacked.mask[k if stacked.mask.shape[0] > 1 else 0])  # [1, ...]: one mask for all K


class StackedMaskedConv2d(StackedLayer):
    """K masked conv layers: weight ``[K, O, C/g, R, S]``, mask of that shape, bias ``[K, O]``."""

    def __init__(self, layers: Sequence[nn.Conv2d]):
        super().__init__()
        first = layers[0]
        self.stride, self.padding, self.dilation, self.groups = first.stride, first.padding, first.dilation, first.groups
        self.padding_mode = first.padding_mode
        self._reversed_padding_repeated_twice = first._reversed_padding_repeated_twice
        self.weight = nn.Parameter(_stacked([m.weight for m in layers]))
        self.bias = nn.Parameter(_stacked([m.bias for m in layers])) if first.bias is not None else None
        masks = [getattr(m, "mask", torch.ones_like(m.weight, dtype=torch.bool)) for m in layers]
        self.register_buffer("mask", _stacked(masks))

    def forward(self, x: Tensor) -> Tensor:
        x, padding = _padded(self, x)
        return ops.stacked_masked_conv2d(x, self.weight, self.mask, self.bias, self.stride, padding, self.dilation,
                                         self.groups)

    def unstack_into(self, k: int, layer: nn.Conv2d):
        _unstack_masked(self, k, layer)


class StackedMaskedLinear(StackedLayer):
    """K masked linear layers: weight ``[K, out, in]``, mask of that shape, bias ``[K, out]``."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(_stacked([m.weight for m in layers]))
        self.bias = nn.Parameter(_stacked([m.bias for m in layers])) if layers[0].bias is not None else None
        masks = [getattr(m, "mask", torch.ones_like(m.weight, dtype=torch.bool)) for m in layers]
        self.register_buffer("mask", _stacked(masks))

    def forward(self, x: Tensor) -> Tensor:
        K, lead = x.shape[0], x.shape[1:-1]
        y = ops.stacked_masked_linear(x.reshape(K, -1, x.shape[-1]), self.weight, self.mask, self.bias)
        return y.view(K, *lead, y.shape[-1])

    def unstack_into(self, k: int, layer: nn.Linear):
        _unstack_masked(self, k, layer)


class StackedBatchNorm2d(StackedLayer):
    """K BatchNorm2d layers, each with its own affine parameters and running statistics.

    The K models' channels are laid side by side (``[B, K*C, H, W]``) so one batch-norm call
    normalises every model over its own batch."""

    def __init__(self, layers: Sequence[nn.BatchNorm2d]):
        super().__init__()
        first = layers[0]
        self.eps, self.momentum, self.affine = first.eps, first.momentum, first.affine
        self.track_running_stats = first.track_running_stats
        if self.affine:
            self.weight = nn.Parameter(_stacked([m.weight for m in layers]))
            self.bias = nn.Parameter(_stacked([m.bias for m in layers]))
        else:
            self.weight = self.bias = None
        if self.track_running_stats:
            self.register_buffer("running_mean", _stacked([m.running_mean for m in layers]))
            self.register_buffer("running_var", _stacked([m.running_var for m in layers]))
            self.register_buffer("num_batches_tracked", first.num_batches_tracked.detach().clone())
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def reset_running_stats(self) -> None:
        """Zero the statistics (REPAIR-style recomputation then averages the next batches)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        K, B, C = x.shape[:3]
        factor = 0.0 if self.momentum is None else self.momentum
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        flat = x.transpose(0, 1).reshape(B, K * C, *x.shape[3:])
        y = F.batch_norm(
            flat,
            None if self.running_mean is None else self.running_mean.view(-1),
            None if self.running_var is None else self.running_var.view(-1),
            None if self.weight is None else self.weight.reshape(-1),
            None if self.bias is None else self.bias.reshape(-1),
            use_batch, factor, self.eps,
        )
        return y.view(B, K, C, *x.shape[3:]).transpose(0, 1)

    def unstack_into(self, k: int, layer: nn.BatchNorm2d):
        if self.affine:
            layer.weight.data.copy_(self.weight[k])
            layer.bias.data.copy_(self.bias[k])
        if self.track_running_stats:
            layer.running_mean.copy_(self.running_mean[k])
            layer.running_var.copy_(self.running_var[k])
            layer.num_batches_tracked.copy_(self.num_batches_tracked)


class StackedGroupNorm(StackedLayer):
    """K GroupNorm layers (instance norm when groups == channels), per-model affine parameters."""

    def __init__(self, layers: Sequence[nn.GroupNorm]):
        super().__init__()
        first = layers[0]
        self.num_groups, self.eps, self.affine = first.num_groups, first.eps, first.affine
        if self.affine:
            self.weight = nn.Parameter(_stacked([m.weight for m in layers]))
            self.bias = nn.Parameter(_stacked([m.bias for m in layers]))

    def forward(self, x: Tensor) -> Tensor:
        K, B = x.shape[:2]
        y = F.group_norm(x.reshape(K * B, *x.shape[2:]), self.num_groups, eps=self.eps).view(x.shape)
        if not self.affine:
            return y
        shape = (K, 1, -1) + (1,) * (x.dim() - 3)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))

    def unstack_into(self, k: int, layer: nn.GroupNorm):
        if self.affine:
            layer.weight.data.copy_(self.weight[k])
            layer.bias.data.copy_(self.bias[k])


class PerSample(StackedLayer):
    """A parameter-free layer run on the K batches merged into one (``[K*B, ...]``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        K, B = x.shape[:2]
        y = self.layer(x.reshape(K * B, *x.shape[2:]))
        return y.view(K, B, *y.shape[1:])

    def unstack_into(self, k: int, layer: nn.Module):
        pass


class InterpolatedMaskedConv2d(StackedLayer):
    """The K networks ``(1 - alphas[k]) * a + alphas[k] * b`` of a stacked pair of conv layers, their
    weights formed inside the kernel (``ops.interpolated_masked_conv2d``) from one copy of each.

    Its stacked tensor is ``alphas`` (``[0, 1]`` at first: the pair itself), so a combination of the
    pair with coefficients ``(1 - alpha, alpha)`` (``load_stacked`` of ``fastmask.combinations``)
    sets the alphas. The pair's masks must be one (``fastmask.combinations.aligned_sources``).
    """

    def __init__(self, pair: StackedMaskedConv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = pair.stride, pair.padding, pair.dilation, pair.groups
        self.padding_mode = pair.padding_mode
        self._reversed_padding_repeated_twice = pair._reversed_padding_repeated_twice
        self.register_buffer("weights", pair.weight.detach())  # [2, O, C/g, R, S]
        self.register_buffer("biases", None if pair.bias is None else pair.bias.detach())  # [2, O]
        self.register_buffer("mask", pair.mask[0])  # the pair's masks are one (aligned_sources)
        self.register_buffer("alphas", torch.tensor([0.0, 1.0], device=pair.weight.device))

    def stacked_tensors(self) -> dict[str, Tensor]:
        return {"alphas": self.alphas}

    def forward(self, x: Tensor) -> Tensor:
        x, padding = _padded(self, x)
        if x.stride(0) == 0:  # one batch seen by every alpha
            x = x[:1]
        biases = (None, None) if self.biases is None else (self.biases[0], self.biases[1])
        return ops.interpolated_masked_conv2d(x, self.weights[0], self.weights[1], self.mask, self.alphas, *biases,
                                              self.stride, padding, self.dilation, self.groups)


class InterpolatedMaskedLinear(StackedLayer):
    """The K networks between a stacked pair of linear layers, formed in the kernel: as
    ``InterpolatedMaskedConv2d``."""

    def __init__(self, pair: StackedMaskedLinear):
        super().__init__()
        self.register_buffer("weights", pair.weight.detach())  # [2, out, in]
        self.register_buffer("biases", None if pair.bias is None else pair.bias.detach())
        self.register_buffer("mask", pair.mask[0])
        self.register_buffer("alphas", torch.tensor([0.0, 1.0], device=pair.weight.device))

    def stacked_tensors(self) -> dict[str, Tensor]:
        return {"alphas": self.alphas}

    def forward(self, x: Tensor) -> Tensor:
        K, lead = len(self.alphas), x.shape[1:-1]
        flat = x[:1] if x.stride(0) == 0 else x
        biases = (None, None) if self.biases is None else (self.biases[0], self.biases[1])
        y = ops.interpolated_masked_linear(flat.reshape(flat.shape[0], -1, x.shape[-1]), self.weights[0],
                                           self.weights[1], self.mask, self.alphas, *biases)
        return y.view(K, *lead, y.shape[-1])


INTERPOLATED_TYPES: dict[type, type] = {StackedMaskedConv2d: InterpolatedMaskedConv2d,
                                        StackedMaskedLinear: InterpolatedMaskedLinear}


STACKED_TYPES: dict[type, type] = {
    MaskedConv2d: StackedMaskedConv2d, nn.Conv2d: StackedMaskedConv2d,
    MaskedLinear: StackedMaskedLinear, nn.Linear: StackedMaskedLinear,
    nn.BatchNorm2d: StackedBatchNorm2d, nn.GroupNorm: StackedGroupNorm,
}
PER_SAMPLE_TYPES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten, nn.Dropout,
                    nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


class Stack(nn.Module):
    """K models of one architecture as one module (see the module docstring).

    Args:
        models: K models with identical structure; their weights, masks and statistics are copied.

    ``forward(x)`` takes ``[K, B, ...]`` (a batch per model); ``forward(x, shared=True)`` one
    batch ``[B, ...]`` for all. Other methods of the models (``embed``) work on stacked tensors.

    Example::

        stack = Stack([models.create("convnet3", 10, (1, 8, 8)) for _ in range(4)])
        logits = stack(torch.randn(4, 32, 1, 8, 8))        # [4, 32, 10]: model k sees batch k
        first, *others = stack.split()                      # back to K separate models
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if len(models) < 1:
            raise ValueError("models must hold at least one model")
        self.num_models = len(models)
        structures = {tuple((n, type(m)) for n, m in model.named_modules()) for model in models}
        if len(structures) != 1:
            raise ValueError("models must share one architecture (the same module names and types)")
        self._template = [copy.deepcopy(models[0])]  # a list keeps it out of the module tree
        self.model = copy.deepcopy(models[0])
        for name, module in list(self.model.named_modules()):
            if not name or not self._is_leaf(module):
                continue
            stacked = self._stack_layer(name, [model.get_submodule(name) for model in models])
            parent, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, attr, stacked)
        self.prunable = list(getattr(models[0], "prunable", [])) or None

    @staticmethod
    def _is_leaf(module: nn.Module) -> bool:
        # An empty container (an identity shortcut) runs unchanged on stacked tensors.
        return not list(module.children()) and not isinstance(module, (nn.Sequential, nn.ModuleList))

    @staticmethod
    def _stack_layer(name: str, layers: list[nn.Module]) -> nn.Module:
        kind = type(layers[0])
        if kind in STACKED_TYPES:
            return STACKED_TYPES[kind](layers)
        if isinstance(layers[0], PER_SAMPLE_TYPES) and not list(layers[0].parameters()):
            return PerSample(copy.deepcopy(layers[0]))
        raise TypeError(f"cannot stack layer {name!r} of type {kind.__name__}")

    @classmethod
    def from_seeds(cls, build: Callable[[], nn.Module], seeds: Sequence[int]) -> "Stack":
        """Stack ``build()`` called once per seed under ``torch.manual_seed(seed)``."""
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build())
        return cls(models)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            attribute = getattr(self._modules["model"], name)  # e.g. embed(): bound to the stacked tree
            return attribute

    def forward(self, x: Tensor, shared: bool = False) -> Tensor:
        if shared:
            x = x.expand(self.num_models, *x.shape)  # stride 0: the kernels read the one batch K times
        elif x.shape[0] != self.num_models:
            raise ValueError(f"input must be [K={self.num_models}, B, ...] (or pass shared=True), "
                             f"got shape {tuple(x.shape)}")
        return self.model(x)

    def stacked_tensors(self) -> dict[str, Tensor]:
        """The K models' floating tensors ``[K, ...]`` by qualified name (``features.0.weight``):
        every stacked layer's ``stacked_tensors``."""
        return {f"{name}.{key}" if name else key: tensor for name, layer in self.model.named_modules()
                if isinstance(layer, StackedLayer) for key, tensor in layer.stacked_tensors().items()}

    def load_stacked(self, tensors: Mapping[str, Tensor]) -> None:
        """Hold ``tensors`` (by qualified name, as ``stacked_tensors`` names them, or ``<layer>.mask``)
        instead, not copied, through each layer's ``load_stacked``: the stack then runs as many models
        as the floating tensors' leading dimension (one for all of them; masks ``[1, ...]`` are shared)."""
        counts = {t.shape[0] for t in tensors.values() if t.is_floating_point()}
        if len(counts) > 1:
            raise ValueError(f"tensors must hold one number of models, got leading dimensions {sorted(counts)}")
        by_layer: dict[str, dict[str, Tensor]] = {}
        for name, tensor in tensors.items():
            layer, _, key = name.rpartition(".")
            by_layer.setdefault(layer, {})[key] = tensor
        for layer, part in by_layer.items():
            self.model.get_submodule(layer).load_stacked(part)
        if counts:
            self.num_models = counts.pop()

    def interpolate_in_kernel(self) -> None:
        """Turn this stack of two models (``a``, ``b``) into the networks ``(1 - alpha) a + alpha b``:
        its masked conv and linear layers become ``InterpolatedMasked*`` layers, which form the
        weights inside the kernels, and combinations ``(1 - alpha, alpha)`` of the two loaded with
        ``load_stacked`` set the alphas (other layers take combined tensors as usual)."""
        if self.num_models != 2:
            raise ValueError(f"interpolate_in_kernel needs a stack of 2 models, this one holds {self.num_models}")
        for name, module in list(self.model.named_modules()):
            interpolated = INTERPOLATED_TYPES.get(type(module))
            if interpolated is not None:
                parent, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, attr, interpolated(module))

    def split(self) -> list[nn.Module]:
        """K ordinary models holding the stack's current weights, masks and statistics."""
        models = []
        for k in range(self.num_models):
            model = copy.deepcopy(self._template[0])
            for name, module in self.model.named_modules():
                if hasattr(module, "unstack_into"):
                    module.unstack_into(k, model.get_submodule(name))
            models.append(model.to(next(self.parameters()).device))
        return models
