"""Linear mode connectivity: the networks on the segment between two weight sets, all at once.

``interpolate(model_a, model_b, alphas, data)`` evaluates the networks
``(1 - alpha) * a + alpha * b`` (Frankle et al., 2020): every floating tensor (weights, biases,
normalisation parameters and running statistics) is interpolated, the masks of masked layers
are kept. It returns the loss and error at each alpha and the barriers
``max over alpha of value(alpha) - (value(0) + value(1)) / 2``. With ``bn_reset_data`` the
BatchNorm statistics of every interpolated network are recomputed from that data instead (as
REPAIR does: reset, momentum None so the average is cumulative, one train-mode pass without
gradient), since interpolated statistics are not the statistics of the interpolated network.

``instability(model, masks, rewind_weights, data, train_cfg)`` is the experiment: two copies of
a (masked) network from the same weights, trained with different data orders and augmentation
(one stack of 2), then interpolated on the train and the test data.

How it runs: the two models become one ``fastmask.stack.Stack``; for a chunk of K alphas every
layer holds its K interpolated tensors as a stack ``[K, ...]`` (BatchNorm statistics too) and
each batch goes once through all K networks (``forward(x, shared=True)``), so the data is read
once per chunk. On CUDA (or with ``FASTMASK_BACKEND=triton``) the conv and linear layers run
``ops.interpolated_masked_conv2d`` / ``ops.interpolated_masked_linear``, which form the K
interpolated masked weights inside the kernels' tile loads from one copy of each model; elsewhere
the K weight sets are materialised and the stacked ops run. K is all the alphas unless memory is
short: on CUDA the chunk comes from the free memory and the measured footprint of one alpha, on
the CPU it is ``CPU_CHUNK``; the results do not depend on it. A model that does not stack (a layer
type ``Stack`` does not know, or forward code that does not run on ``[K, B, ...]`` tensors: checked
on two examples against the models themselves) is evaluated one alpha at a time, with a warning.

Where the masks of the two models differ, the network at alpha interpolates the masked weights
``(1 - alpha) * (w_a * m_a) + alpha * (w_b * m_b)``, under the union of the masks.

Example::

    from fastmask import lmc
    result = lmc.interpolate(model_a, model_b, 30, splits.test)
    print(result.barrier_error, result.error)
    repaired = lmc.interpolate(model_a, model_b, 30, splits.test, bn_reset_data=splits.train)

    runs = lmc.instability(model, masks, rewind_state, splits, TrainConfig(epochs=10))
    print(runs.test.barrier_error, runs.train.barrier_error)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastmask import backend, ops
from fastmask.data import Dataset, DataSplits
from fastmask.nn import is_masked, set_masks
from fastmask.stack import Stack, StackedBatchNorm2d, StackedMaskedConv2d, StackedMaskedLinear

__all__ = ["InterpolationResult", "InstabilityResult", "interpolate", "instability", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = 30  # evenly spaced, endpoints included (Frankle et al., 2020)
DEFAULT_BATCH_SIZE = 1024  # examples per batch when data is a fastmask Dataset
CPU_CHUNK = 16  # alphas (or grid points) per pass on the CPU
MEMORY_FRACTION = 0.6  # of the free CUDA memory a chunk may take; the rest covers what one probe cannot see
# The stack check runs float64 copies on the torch reference path: sums in another order differ
# by ~1e-15 there, a forward that mixes the models by O(1), whatever backend or TF32 setting.
STACK_CHECK_TOLERANCE = 1e-6


class StackFallbackWarning(UserWarning):
    """The networks were evaluated one at a time (one pass over the data each) because the models
    do not stack. Shown at every occurrence: it can make an evaluation K times slower."""


warnings.simplefilter("always", StackFallbackWarning)

LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class InterpolationResult:
    """Loss and error (1 - accuracy) at each alpha, and the barriers (Frankle et al., 2020).

    ``barrier_loss`` / ``barrier_error``: the maximum over alpha of the value minus the mean of
    the values at alpha 0 and alpha 1. ``bn_reset`` tells whether BatchNorm statistics were
    recomputed for every alpha.
    """

    alphas: list[float]
    loss: list[float]
    error: list[float]
    bn_reset: bool = False

    @property
    def barrier_loss(self) -> float:
        return _barrier(self.alphas, self.loss)

    @property
    def barrier_error(self) -> float:
        return _barrier(self.alphas, self.error)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "loss": self.loss, "error": self.error, "barrier_loss": self.barrier_loss,
                "barrier_error": self.barrier_error, "bn_reset": self.bn_reset}


def _barrier(alphas: list[float], values: list[float]) -> float:
    ends = (values[alphas.index(0.0)] + values[alphas.index(1.0)]) / 2
    return max(values) - ends


@dataclasses.dataclass
class InstabilityResult:
    """What ``instability`` returns: the two trained copies and their interpolations.

    ``train_reset`` / ``test_reset`` (with BatchNorm statistics recomputed on the training data)
    are set when ``bn_reset=True`` was asked for.
    """

    models: tuple[nn.Module, nn.Module]
    train: InterpolationResult
    test: InterpolationResult
    train_reset: Optional[InterpolationResult] = None
    test_reset: Optional[InterpolationResult] = None


# ----------------------------------------------------------------------------- input checks


def _check_models(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """All models one architecture (module names and types, tensor names and shapes) on one device."""
    for model, name in zip(models, names):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    first, first_name = models[0], names[0]
    modules = dict((n, type(m)) for n, m in first.named_modules())
    shapes = {n: tuple(t.shape) for n, t in first.state_dict().items()}
    for model, name in zip(models[1:], names[1:]):
        other = dict((n, type(m)) for n, m in model.named_modules())
        if other != modules:
            diff = sorted({n for n, _ in set(other.items()) ^ set(modules.items())})[0]
            raise ValueError(f"{first_name} and {name} must share one architecture: module {diff!r} is "
                             f"{_describe_module(modules.get(diff))} in {first_name} but "
                             f"{_describe_module(other.get(diff))} in {name}")
        state = model.state_dict()
        if set(state) != set(shapes):
            key = sorted(set(state) ^ set(shapes))[0]
            raise ValueError(f"{first_name} and {name} must share one architecture: tensor {key!r} is in "
                             f"{first_name if key in shapes else name} only")
        for key, tensor in state.items():
            if shapes[key] != tuple(tensor.shape):
                raise ValueError(f"{first_name} and {name} must share one architecture: tensor {key!r} has shape "
                                 f"{shapes.get(key)} in {first_name} but {tuple(tensor.shape)} in {name}")
    devices = {t.device for model in models for t in model.state_dict().values()}
    if len(devices) > 1:
        raise ValueError(f"{' and '.join(names)} must be on one device, got {sorted(map(str, devices))}")


def _describe_module(kind) -> str:
    return "missing" if kind is None else kind.__name__


def alpha_grid(alphas) -> list[float]:
    """``alphas`` as a list: an int n >= 2 gives n evenly spaced values from 0 to 1 (both included);
    a sequence must lie in [0, 1] and hold 0 and 1 (the barrier's endpoints)."""
    if isinstance(alphas, bool):
        raise TypeError("alphas must be an int or a sequence of floats, got a bool")
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError(f"alphas must be at least 2 (the endpoints), got {alphas}")
        return [i / (alphas - 1) for i in range(alphas)]
    if isinstance(alphas, Tensor):
        alphas = alphas.detach().cpu().flatten().tolist()
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise TypeError(f"alphas must be an int or a sequence of floats, got {alphas!r}") from None
    if not all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"alphas must lie in [0, 1], got {values}")
    if 0.0 not in values or 1.0 not in values:
        raise ValueError(f"alphas must include 0 and 1 (the endpoints of the barrier), got {values}")
    return values


class _Batches:
    """``data`` as a re-iterable of (inputs, targets) on ``device``: a fastmask Dataset (cut into
    batches), or any iterable of pairs (a one-shot iterator is kept as a list, since chunks of
    alphas may need several passes)."""

    def __init__(self, data, device: torch.device, batch_size: int, name: str):
        if data is None:
            raise TypeError(f"{name} is required: an iterable of (inputs, targets) batches or a fastmask Dataset")
        if isinstance(data, DataSplits):
            raise TypeError(f"{name} must be one Dataset (e.g. splits.test), not DataSplits")
        if not isinstance(data, Dataset):
            try:
                iterator = iter(data)
            except TypeError:
                raise TypeError(f"{name} must be an iterable of (inputs, targets) batches or a fastmask Dataset, "
                                f"got {type(data).__name__}") from None
            if iterator is data:
                data = list(data)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.device, self.batch_size, self.name = data, device, batch_size, name
        if self.first() is None:
            raise ValueError(f"{name} holds no examples")

    def __iter__(self):
        if isinstance(self.data, Dataset):
            for start in range(0, len(self.data), self.batch_size):
                yield (self.data.images[start:start + self.batch_size].to(self.device),
                       self.data.labels[start:start + self.batch_size].to(self.device))
            return
        for i, batch in enumerate(self.data):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
                raise TypeError(f"{self.name}: batch {i} must be a pair (inputs, targets) of tensors, "
                                f"got {type(batch).__name__}")
            inputs, targets = batch
            if targets.dim() != 1 or targets.shape[0] != inputs.shape[0] or targets.is_floating_point():
                raise ValueError(f"{self.name}: batch {i} must have integer class targets [B] for inputs [B, ...], "
                                 f"got targets {targets.dtype} {tuple(targets.shape)}, inputs {tuple(inputs.shape)}")
            yield inputs.to(self.device), targets.to(self.device)

    def first(self) -> Optional[tuple[Tensor, Tensor]]:
        return next(iter(self), None)


# ----------------------------------------------------------------------------- K networks from J sources


def aligned_sources(models: Sequence[nn.Module]) -> list[nn.Module]:
    """The models, or copies of them whose masked weights are pre-masked and whose masks are the
    union of the models' masks where those differ: any combination of the copies' weights under
    their (shared) masks is then the combination of the models' masked weights."""
    differing = []
    for name, module in models[0].named_modules():
        if is_masked(module):
            masks = [model.get_submodule(name).mask for model in models]
            if not all(torch.equal(masks[0], m) for m in masks[1:]):
                differing.append((name, torch.stack(masks).any(0)))
    if not differing:
        return list(models)
    copies = [copy.deepcopy(model) for model in models]
    with torch.no_grad():
        for name, union in differing:
            for model in copies:
                layer = model.get_submodule(name)
                layer.weight.mul_(layer.mask)
                layer.mask.copy_(union)
    return copies


class _InterpolatedConv2d(nn.Module):
    """The K = len(alphas) interpolations of a stacked pair of conv layers, formed in the kernel."""

    def __init__(self, pair: StackedMaskedConv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = pair.stride, pair.padding, pair.dilation, pair.groups
        self.padding_mode = pair.padding_mode
        self._reversed_padding_repeated_twice = pair._reversed_padding_repeated_twice
        self.register_buffer("weights", pair.weight.detach())  # [2, O, C/g, R, S]
        self.register_buffer("biases", None if pair.bias is None else pair.bias.detach())  # [2, O]
        self.register_buffer("mask", pair.mask[0])  # the pair's masks are one (aligned_sources)
        self.alphas: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            K, B = x.shape[:2]
            x = F.pad(x.flatten(0, 1), self._reversed_padding_repeated_twice, mode=self.padding_mode)
            x, padding = x.view(K, B, *x.shape[1:]), 0
        if x.stride(0) == 0:  # one batch seen by every alpha
            x = x[:1]
        biases = (None, None) if self.biases is None else (self.biases[0], self.biases[1])
        return ops.interpolated_masked_conv2d(x, self.weights[0], self.weights[1], self.mask, self.alphas, *biases,
                                              self.stride, padding, self.dilation, self.groups)


class _InterpolatedLinear(nn.Module):
    """The K = len(alphas) interpolations of a stacked pair of linear layers, formed in the kernel."""

    def __init__(self, pair: StackedMaskedLinear):
        super().__init__()
        self.register_buffer("weights", pair.weight.detach())  # [2, out, in]
        self.register_buffer("biases", None if pair.bias is None else pair.bias.detach())
        self.register_buffer("mask", pair.mask[0])
        self.alphas: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        K, lead = len(self.alphas), x.shape[1:-1]
        flat = x[:1] if x.stride(0) == 0 else x
        biases = (None, None) if self.biases is None else (self.biases[0], self.biases[1])
        y = ops.interpolated_masked_linear(flat.reshape(flat.shape[0], -1, x.shape[-1]), self.weights[0],
                                           self.weights[1], self.mask, self.alphas, *biases)
        return y.view(K, *lead, y.shape[-1])


class Combinations:
    """K networks whose every floating tensor is ``sum_j coefficients[k, j] * source_j``'s tensor,
    held as one stacked module (the sources must share their masks: see ``aligned_sources``).

    With ``in_kernel`` (two sources, coefficients ``(1 - alpha, alpha)``), conv and linear layers
    keep the two weight sets and interpolate them inside the kernels; otherwise every tensor is
    materialised as a stack ``[K, ...]`` by ``networks``.
    """

    def __init__(self, stack: Stack, in_kernel: bool):
        self.model = stack.model
        self.kernel_layers: list[nn.Module] = []
        if in_kernel:
            for name, module in list(self.model.named_modules()):
                replacement = {StackedMaskedConv2d: _InterpolatedConv2d,
                               StackedMaskedLinear: _InterpolatedLinear}.get(type(module))
                if replacement is not None:
                    layer = replacement(module)
                    parent, _, attr = name.rpartition(".")
                    setattr(self.model.get_submodule(parent) if parent else self.model, attr, layer)
                    self.kernel_layers.append(layer)
        self.sources: list[tuple[nn.Module, str, bool, Tensor]] = []  # (module, name, is_parameter, [J, ...])
        for module in self.model.modules():
            if module in self.kernel_layers:
                continue
            for name, tensor in module.named_parameters(recurse=False):
                self.sources.append((module, name, True, tensor.detach()))
            for name, tensor in module.named_buffers(recurse=False):
                if name == "mask":  # the sources' masks are one: keep a single copy, shared by all K
                    module._buffers[name] = tensor[:1]
                elif tensor.is_floating_point():
                    self.sources.append((module, name, False, tensor.detach()))
        self.batch_norms = [m for m in self.model.modules() if isinstance(m, StackedBatchNorm2d)
                            and m.track_running_stats]

    def networks(self, coefficients: Tensor) -> Callable[[Tensor], Tensor]:
        """Set the K networks of ``coefficients`` ``[K, J]``; returns their forward for one shared batch."""
        K = coefficients.shape[0]
        for layer in self.kernel_layers:
            layer.alphas = coefficients[:, 1].to(layer.weights.device, torch.float32)
        for module, name, is_parameter, source in self.sources:
            compute = torch.promote_types(source.dtype, torch.float32)
            combined = torch.tensordot(coefficients.to(source.device, compute), source.to(compute), dims=1)
            combined = combined.to(source.dtype)
            if is_parameter:
                module._parameters[name] = nn.Parameter(combined, requires_grad=False)
            else:
                module._buffers[name] = combined
        return lambda x: self.model(x.expand(K, *x.shape))


def stack_or_none(models: Sequence[nn.Module], inputs: Tensor) -> Optional[Stack]:
    """A Stack of ``models`` (in eval mode) if it computes what they compute, else None with a
    ``StackFallbackWarning``: the caller then evaluates one network at a time.

    The check runs float64 copies of the models and of their stack on two examples in eval mode,
    so it compares the models' forward code, not the kernels, the backend or TF32 rounding."""
    try:
        stack = Stack(models)
    except TypeError as error:
        _warn_one_at_a_time(f"the models do not stack ({error})")
        return None
    reason = _stack_mismatch(models, inputs)
    if reason is not None:
        _warn_one_at_a_time(reason)
        return None
    return stack.eval()


def _stack_mismatch(models: Sequence[nn.Module], inputs: Tensor) -> Optional[str]:
    """None when a Stack of float64 copies of ``models`` gives the copies' outputs on ``inputs[:2]``; else why not."""
    copies = [copy.deepcopy(model).double().eval() for model in models]
    probe = inputs[:2].double() if inputs.is_floating_point() else inputs[:2]
    try:
        with torch.no_grad():  # float64 takes the torch reference path on every backend
            expected = torch.stack([model(probe) for model in copies])
            got = Stack(copies).eval()(probe, shared=True)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"the models' forward does not run on stacked [K, B, ...] tensors ({error})"
    if got.shape != expected.shape:
        return f"the stacked models give outputs of shape {tuple(got.shape)}, the models {tuple(expected.shape)}"
    difference = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    if not difference <= STACK_CHECK_TOLERANCE:
        return (f"the stacked models compute something else than the models (relative difference {difference:.2g} "
                "in float64: their forward code is not agnostic to a leading model dimension)")
    return None


def _warn_one_at_a_time(reason: str) -> None:
    warnings.warn(f"{reason}; evaluating one network at a time, one pass over the data each", StackFallbackWarning,
                  stacklevel=4)


# ----------------------------------------------------------------------------- evaluation


def _recompute_batch_norm(forward: Callable[[Tensor], Tensor], model: nn.Module, batch_norms: Sequence[nn.Module],
                          batches: _Batches) -> None:
    """REPAIR-style: reset the statistics, then one cumulative (momentum None) train-mode pass, no gradient."""
    if not batch_norms:
        return
    for bn in batch_norms:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        for inputs, _ in batches:
            forward(inputs)
    model.eval()


def _accumulate(forward: Callable[[Tensor], Tensor], K: int, batches: _Batches, loss_fn: Optional[LossFn]):
    """Mean loss and error over all examples of the K networks of ``forward`` (logits [K, B, classes])."""
    loss_sum = correct = None
    count = 0
    with torch.no_grad():
        for inputs, targets in batches:
            logits = forward(inputs)
            if logits.dtype != torch.float64:
                logits = logits.float()
            B = targets.shape[0]
            if loss_fn is None:
                batch_loss = F.cross_entropy(logits.flatten(0, 1), targets.repeat(K), reduction="none")
                batch_loss = batch_loss.view(K, B).sum(1)
            else:
                batch_loss = torch.stack([torch.as_tensor(loss_fn(logits[k], targets)) for k in range(K)]) * B
            hits = (logits.argmax(-1) == targets).sum(1)
            loss_sum = batch_loss.double() if loss_sum is None else loss_sum + batch_loss.double()
            correct = hits if correct is None else correct + hits
            count += B
    return (loss_sum / count).tolist(), (1 - correct.double() / count).tolist()


def _chunk_size(combinations: Combinations, coefficients: Tensor, inputs: Tensor, requested: Optional[int]) -> int:
    """Networks per pass: ``requested``; ``CPU_CHUNK`` on the CPU; on CUDA ``_fitting_chunk``."""
    K = coefficients.shape[0]
    if requested is not None:
        return min(requested, K)
    if inputs.device.type != "cuda":
        return min(CPU_CHUNK, K)
    return _fitting_chunk(combinations, coefficients, inputs, inputs.device)


def _fitting_chunk(combinations: Combinations, coefficients: Tensor, inputs: Tensor, device: torch.device) -> int:
    """The networks that fit in ``MEMORY_FRACTION`` of ``device``'s free memory (what the caching
    allocator holds unused counts as free), from one network's footprint measured on ``inputs``:
    the largest allocation seen after any module's forward, above what was allocated before."""
    K = coefficients.shape[0]
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    readings = [base]
    hooks = [m.register_forward_hook(lambda *_: readings.append(torch.cuda.memory_allocated(device)))
             for m in combinations.model.modules()]
    try:
        forward = combinations.networks(coefficients[:1])
        readings.append(torch.cuda.memory_allocated(device))
        with torch.no_grad():
            forward(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    per_network = max(max(readings) - base, 1)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(K, int(MEMORY_FRACTION * free / per_network)))


def evaluate_combinations(models: Sequence[nn.Module], coefficients: Tensor, data, *, loss_fn: Optional[LossFn] = None,
                          bn_reset_data=None, batch_size: int = DEFAULT_BATCH_SIZE, chunk: Optional[int] = None,
                          in_kernel: bool = False, progress: bool = False, what: str = "networks"):
    """Loss and error lists over ``data`` of the K networks ``sum_j coefficients[k, j] * models[j]``
    (``coefficients`` ``[K, J]`` float64); the engine of ``interpolate`` and ``fastmask.landscape``.

    ``models`` must already be checked (one architecture, one device) and aligned (``aligned_sources``).
    """
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    device = next((t.device for t in models[0].state_dict().values()), torch.device("cpu"))
    batches = _Batches(data, device, batch_size, "data")
    reset = None if bn_reset_data is None else _Batches(bn_reset_data, device, batch_size, "bn_reset_data")
    inputs = batches.first()[0]
    K = coefficients.shape[0]
    stack = stack_or_none(models, inputs)
    losses: list[float] = []
    errors: list[float] = []
    if stack is None:
        network = copy.deepcopy(models[0])
        states = [model.state_dict() for model in models]
        batch_norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.track_running_stats]
        for row in tqdm(coefficients.tolist(), desc=what, disable=not progress, leave=False):
            network.load_state_dict({name: sum(c * state[name] for c, state in zip(row, states))
                                     if tensor.is_floating_point() else tensor for name, tensor in states[0].items()})
            network.eval()
            forward = lambda x: network(x).unsqueeze(0)  # noqa: E731
            if reset is not None:
                _recompute_batch_norm(forward, network, batch_norms, reset)
            loss, error = _accumulate(forward, 1, batches, loss_fn)
            losses += loss
            errors += error
        return losses, errors
    combinations = Combinations(stack, in_kernel)
    size = _chunk_size(combinations, coefficients, inputs, chunk)
    bar = tqdm(total=K, desc=what, disable=not progress, leave=False)
    for start in range(0, K, size):
        part = coefficients[start:start + size]
        forward = combinations.networks(part)
        combinations.model.eval()
        if reset is not None:
            _recompute_batch_norm(forward, combinations.model, combinations.batch_norms, reset)
        loss, error = _accumulate(forward, part.shape[0], batches, loss_fn)
        losses += loss
        errors += error
        bar.update(part.shape[0])
    bar.close()
    return losses, errors


# ----------------------------------------------------------------------------- public API


def interpolate(model_a: nn.Module, model_b: nn.Module, alphas=DEFAULT_ALPHAS, data=None,
                loss_fn: Optional[LossFn] = None, bn_reset_data=None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                chunk: Optional[int] = None, progress: bool = False) -> InterpolationResult:
    """Evaluate the networks ``(1 - alpha) * model_a + alpha * model_b`` over ``data``.

    Args:
        model_a, model_b: two models of one architecture (masked or not) on one device; unchanged.
        alphas: an int n (n evenly spaced values from 0 to 1, endpoints included; default 30 as
            Frankle et al.) or a sequence of values in [0, 1] that includes 0 and 1.
        data: a fastmask ``Dataset`` (cut into ``batch_size`` batches) or an iterable of
            ``(inputs, targets)`` batches with integer class targets (a list works).
        loss_fn: ``loss_fn(logits [B, classes], targets [B])`` -> the batch's mean loss; the
            default is cross-entropy. Either way the loss is averaged over all examples.
        bn_reset_data: when given (like ``data``), each network's BatchNorm statistics are
            recomputed from it (reset, cumulative average, train mode, no gradient) instead of
            interpolated.
        chunk: networks evaluated per pass (default: all that fit; see the module docstring).
        progress: a progress bar over the alphas.

    Returns an ``InterpolationResult`` (``loss``, ``error`` per alpha, ``barrier_loss``, ``barrier_error``).

    Example::

        result = interpolate(model_a, model_b, 30, splits.test)
        result.error[0], result.error[-1]        # the two models' own test errors
    """
    _check_models([model_a, model_b], ["model_a", "model_b"])
    values = alpha_grid(alphas)
    coefficients = torch.tensor([[1.0 - a, a] for a in values], dtype=torch.float64)
    sources = aligned_sources([model_a, model_b])
    weights = [p for p in model_a.parameters() if p.is_floating_point()]
    in_kernel = bool(weights) and backend.use_triton(weights[0])
    loss, error = evaluate_combinations(sources, coefficients, data, loss_fn=loss_fn, bn_reset_data=bn_reset_data,
                                        batch_size=batch_size, chunk=chunk, in_kernel=in_kernel, progress=progress,
                                        what="alphas")
    return InterpolationResult(values, loss, error, bn_reset=bn_reset_data is not None)


def instability(model: nn.Module, masks: Optional[dict[str, Tensor]], rewind_weights: Optional[dict[str, Tensor]],
                data: DataSplits, train_cfg, seeds: Sequence[int] = (0, 1), alphas=DEFAULT_ALPHAS, *,
                bn_reset: bool = False, progress: bool = False) -> InstabilityResult:
    """Instability to SGD noise (Frankle et al., 2020): train two copies of ``model`` from the same
    weights and mask with different data orders and augmentation, then interpolate them.

    Args:
        model: the architecture (a fastmask model, or one ``fastmask.sparsify`` made masked when
            ``masks`` is given); not modified.
        masks: ``{"<module>.weight": mask}`` as ``fastmask.nn.get_masks`` gives them, or None (as is).
        rewind_weights: the state_dict both copies start from (e.g. IMP's rewind point), or None
            for ``model``'s current weights.
        data: ``fastmask.data.DataSplits``; training on ``data.train``, interpolation on train and test.
        train_cfg: a ``fastmask.train.TrainConfig``.
        seeds: the two copies' data-order and augmentation seeds; both train as one stack of 2.
        alphas: as ``interpolate``.
        bn_reset: also interpolate with BatchNorm statistics recomputed on ``data.train``.

    Example::

        runs = instability(model, masks, checkpoints[0], splits, TrainConfig(epochs=10))
        runs.test.barrier_error < 0.02        # "stable" in Frankle et al.'s sense
    """
    from fastmask.train import fit

    if not isinstance(data, DataSplits):
        raise TypeError(f"data must be a fastmask.data.DataSplits, got {type(data).__name__}")
    seeds = list(seeds)
    if len(seeds) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be two ints, got {seeds!r}")
    values = alpha_grid(alphas)
    start = copy.deepcopy(model)
    if rewind_weights is not None:
        start.load_state_dict(rewind_weights)
    if masks is not None:
        set_masks(start, masks)
    pair = Stack([start, start])
    fit(pair, data.train, train_cfg, seed=seeds, progress=progress, description="instability")
    model_a, model_b = pair.split()
    runs = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        runs[split] = interpolate(model_a, model_b, values, dataset, progress=progress)
        if bn_reset:
            runs[f"{split}_reset"] = interpolate(model_a, model_b, values, dataset, bn_reset_data=data.train,
                                                 progress=progress)
    return InstabilityResult((model_a, model_b), **runs)
