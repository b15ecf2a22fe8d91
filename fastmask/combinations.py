"""K networks combined from J source models, evaluated over data as one stack: the engine of
linear mode connectivity (``fastmask.lmc``: the alphas of a segment) and loss landscapes
(``fastmask.landscape``: the points of a plane).

``evaluate_combinations(models, coefficients, data)`` gives the loss and error over ``data`` of
the K networks ``sum_j coefficients[k, j] * models[j]``: every floating tensor (weights, biases,
normalisation parameters and running statistics) is combined, the masks are kept. With
``bn_reset_data`` the BatchNorm statistics of every network are recomputed from that data instead
(as REPAIR does: reset, momentum None so the average is cumulative, one train-mode pass without
gradient), since combined statistics are not the statistics of the combined network.

How it runs: the J models become one ``fastmask.stack.Stack``; for a chunk of K combinations
every stacked layer takes its K combined tensors (``Stack.load_stacked``) and each batch goes
once through all K networks (``forward(x, shared=True)``), so the data is read once per chunk.
With ``in_kernel`` (two models, coefficients ``(1 - alpha, alpha)``) the conv and linear layers
keep the two weight sets and form the K interpolated masked weights inside the kernels
(``Stack.interpolate_in_kernel``). K is all the combinations unless memory is short: on CUDA the
chunk comes from the free memory and the measured footprint of one network, on the CPU it is
``CPU_CHUNK``; the results do not depend on it. On the CPU (``ONE_AT_A_TIME_DEVICES``) one plain
network per combination is faster (the loop researchers write, with each network's weights
combined in place)
and is taken unless the caller gives a ``chunk``: both give the same numbers within rounding.
Models that do not stack (a layer type ``Stack``
does not know, or forward code that does not run on ``[K, B, ...]`` tensors: checked on two
examples against the models themselves) are evaluated one network at a time, with a warning.

The sources must share their masks: ``aligned_sources`` makes copies that do where the models'
masks differ (the combined network then combines the masked weights, under the union of the masks).

Example::

    from fastmask import combinations
    combinations.check_models([a, b, c], ["a", "b", "c"])
    sources = combinations.aligned_sources([a, b, c])
    coefficients = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]], dtype=torch.float64)
    loss, error = combinations.evaluate_combinations(sources, coefficients, splits.test)
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastmask.evaluation import DEFAULT_BATCH_SIZE, Batches, LossFn, forward_of, loss_and_error
from fastmask.nn import is_masked
from fastmask.stack import Stack, StackedBatchNorm2d

__all__ = ["check_models", "aligned_sources", "Combinations", "stack_or_none", "evaluate_combinations", "CPU_CHUNK",
           "MEMORY_FRACTION", "STACK_CHECK_TOLERANCE", "StackFallbackWarning"]

CPU_CHUNK = 16  # combinations per pass on the CPU
# Devices where one plain network per combination beats the stacked chunk: on the 2-core CPU
# (LMC of 30 alphas on digits, ConvNet-3 width 128, one thread, under load) the stack ran at
# 0.43-0.6x the loop's speed in this session and lost 2 of 3 runs in issue 22's; a fixed rule,
# not a timing, so that a rerun gives the same numbers.
ONE_AT_A_TIME_DEVICES = ("cpu",)
MEMORY_FRACTION = 0.6  # of the free CUDA memory a chunk may take; the rest covers what one probe cannot see
# The stack check runs float64 copies on the torch reference path: sums in another order differ
# by ~1e-15 there, a forward that mixes the models by O(1), whatever backend or TF32 setting.
STACK_CHECK_TOLERANCE = 1e-6


class StackFallbackWarning(UserWarning):
    """The networks were evaluated one at a time (one pass over the data each) because the models
    do not stack. Shown at every occurrence: it can make an evaluation K times slower."""


warnings.simplefilter("always", StackFallbackWarning)


def check_models(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """All ``models`` one architecture (module names and types, tensor names and shapes) on one device;
    errors name them by ``names``."""
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



class Combinations:
    """K networks whose every floating tensor is ``sum_j coefficients[k, j] * source_j``'s tensor,
    held as one stack of the J sources (which must share their masks: see ``aligned_sources``).

    With ``in_kernel`` (two sources, coefficients ``(1 - alpha, alpha)``), conv and linear layers
    keep the two weight sets and interpolate them inside the kernels; otherwise every tensor is
    materialised as a stack ``[K, ...]`` by ``networks``.
    """

    def __init__(self, stack: Stack, in_kernel: bool):
        self.stack = stack
        # The sources' masks are one: keep a single copy, shared by all K networks.
        stack.load_stacked({name: mask[:1] for name, mask in stack.model.named_buffers()
                            if name.rpartition(".")[2] == "mask"})
        if in_kernel:
            stack.interpolate_in_kernel()
        self.sources = stack.stacked_tensors()  # [J, ...] by name
        self.batch_norms = [m for m in stack.modules() if isinstance(m, StackedBatchNorm2d) and m.track_running_stats]

    def networks(self, coefficients: Tensor) -> Callable[[Tensor], Tensor]:
        """Set the K networks of ``coefficients`` ``[K, J]``; returns their forward for one shared batch."""
        combined = {}
        for name, source in self.sources.items():
            compute = torch.promote_types(source.dtype, torch.float32)
            combined[name] = torch.tensordot(coefficients.to(source.device, compute), source.to(compute),
                                             dims=1).to(source.dtype)
        self.stack.load_stacked(combined)
        return lambda x: self.stack(x, shared=True)


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


def _recompute_batch_norm(forward: Callable[[Tensor], Tensor], model: nn.Module, batch_norms: Sequence[nn.Module],
                          batches: Batches) -> None:
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
             for m in combinations.stack.modules()]
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
                          bn_reset_data=None, batch_size: Optional[int] = None, chunk: Optional[int] = None,
                          in_kernel: bool = False, progress: bool = False, what: str = "networks"):
    """Loss and error lists over ``data`` of the K networks ``sum_j coefficients[k, j] * models[j]``
    (``coefficients`` ``[K, J]`` float64): the engine of ``fastmask.lmc`` and ``fastmask.landscape``.

    ``models`` must already be checked (``check_models``) and aligned (``aligned_sources``). ``data`` and
    ``bn_reset_data``: as ``fastmask.lmc.interpolate`` (``batch_size`` None: the evaluation's
    ``evaluation.default_batch_size`` of the device, and ``DEFAULT_BATCH_SIZE`` for the BatchNorm
    statistics, which depend on the batches); ``in_kernel``: see ``Combinations``; ``chunk``:
    networks per stacked pass (given, it also keeps the stack on ``ONE_AT_A_TIME_DEVICES``);
    ``what`` names the networks on the progress bar.
    """
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    device = next((t.device for t in models[0].state_dict().values()), torch.device("cpu"))
    batches = Batches(data, device, batch_size, "data")
    reset = None if bn_reset_data is None else Batches(bn_reset_data, device, batch_size or DEFAULT_BATCH_SIZE,
                                                       "bn_reset_data")
    inputs = batches.first()[0]
    K = coefficients.shape[0]
    stack = None if chunk is None and device.type in ONE_AT_A_TIME_DEVICES else stack_or_none(models, inputs)
    if stack is None:
        return _one_at_a_time(models, coefficients, batches, reset, loss_fn, progress, what)
    combinations = Combinations(stack, in_kernel)
    size = _chunk_size(combinations, coefficients, inputs, chunk)
    losses: list[float] = []
    errors: list[float] = []
    bar = tqdm(total=K, desc=what, disable=not progress, leave=False)
    for start in range(0, K, size):
        part = coefficients[start:start + size]
        forward = combinations.networks(part)
        combinations.stack.eval()
        if reset is not None:
            _recompute_batch_norm(forward, combinations.stack, combinations.batch_norms, reset)
        loss, error = loss_and_error(forward, part.shape[0], batches, loss_fn)
        losses += loss
        errors += error
        bar.update(part.shape[0])
    bar.close()
    return losses, errors


def _combined_network(models: Sequence[nn.Module]) -> tuple[nn.Module, Callable[[Sequence[float]], None]]:
    """One plain copy of the models' architecture and ``load(row)``, which makes it the network
    ``sum_j row[j] * models[j]`` (in eval mode).

    ``load`` writes the floating tensors in place, one foreach op per model (a multiply, then
    scaled adds), instead of building a state per network for ``load_state_dict`` (~100 small ops
    and their allocations for ConvNet-3: see bench/README.md, LMC). It takes the copy's
    ``state_dict(keep_vars=True)`` to be its live tensors (true of torch's and fastmask's modules; a
    module whose state-dict hooks rewrite its state would need the state per network). A tensor held
    under several names (tied weights) is written once; where floating tensors share memory
    otherwise (views of one another), the state per network is built and loaded instead. Masks and
    other non-floating tensors keep models[0]'s values."""
    network = copy.deepcopy(models[0])
    states = [model.state_dict() for model in models]
    live = network.state_dict(keep_vars=True)  # the copy's parameters and buffers themselves
    views = {}  # (storage, offset, shape, stride) -> the first name holding that view
    for name, tensor in live.items():
        if tensor.is_floating_point():
            views.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                              tensor.stride()), name)
    shared_memory = len({storage for storage, *_ in views}) < len(views)
    floating = list(views.values())
    targets = [live[name].detach() for name in floating]
    sources = [[state[name] for name in floating] for state in states]

    @torch.no_grad()
    def load_in_place(row):
        torch._foreach_copy_(targets, sources[0])
        torch._foreach_mul_(targets, row[0])
        for c, source in zip(row[1:], sources[1:]):
            torch._foreach_add_(targets, source, alpha=c)
        network.eval()

    def load_state(row):
        network.load_state_dict({name: sum(c * state[name] for c, state in zip(row, states))
                                 if tensor.is_floating_point() else tensor for name, tensor in states[0].items()})
        network.eval()

    return network, (load_state if shared_memory else load_in_place)


def _one_at_a_time(models, coefficients, batches, reset, loss_fn, progress, what):
    """The loop researchers write: one plain network per combination (``_combined_network``), one
    pass over the data each."""
    network, load = _combined_network(models)
    batch_norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   and m.track_running_stats]
    losses: list[float] = []
    errors: list[float] = []
    for row in tqdm(coefficients.tolist(), desc=what, disable=not progress, leave=False):
        load(row)
        forward, _ = forward_of(network)
        if reset is not None:
            _recompute_batch_norm(forward, network, batch_norms, reset)
        loss, error = loss_and_error(forward, 1, batches, loss_fn)
        losses += loss
        errors += error
    return losses, errors
