"""Curvature of the mean training loss: the Hutchinson estimate of the Hessian diagonal, its
trace, per-layer summaries, and the top eigenvalue by power iteration.

The Hessian is that of the mean loss over all of ``data`` with respect to the model's trainable
parameters, with normalisation layers in eval mode (running statistics, nothing updated).
Hutchinson: for Rademacher probes z (entries +-1), E[z * Hz] = diag(H) and E[z^T H z] = tr(H);
each estimate comes with its standard error over the probes.

How it runs: probes are drawn from a counter-based generator (Philox4x32-10 keyed by the seed,
each draw's 128 bits giving 128 entries),
so probe p is the same whatever the batching; ``probe_batch`` probes are taken together, their
Hessian-vector products formed per device and size (``_MeanLossHessian``: on the CPU for all but
small models the gradient's graph built once per batch and one double backward per probe,
otherwise ``torch.func``'s vmap over forward-over-reverse ``jvp(grad)``, each falling back to the next way where an op lacks what it
needs; every way gives the same products within rounding); z * Hz is folded into running
per-entry means and variances in one pass. On CUDA the probes and the
accumulation are Triton kernels; elsewhere their torch references, which draw the very same probes
(``fastmask.ops.hutchinson``).

Masked models: a parameter with a mask (``fastmask.masks.by_parameter``: a ``weight`` beside a
``mask`` buffer, as fastmask's ``MaskedConv2d`` / ``MaskedLinear``, or ``torch.nn.utils.prune``'s
``<name>_orig`` beside ``<name>_mask``) is probed on its unpruned entries only: its pruned entries
report a diagonal of 0 and are left out of the trace and the summaries.

Example::

    from fastmask.hessian import hessian_diag, top_eigenvalue
    loss_fn = torch.nn.functional.cross_entropy
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]
    h = hessian_diag(model, loss_fn, batches, num_probes=100, seed=0)
    print(h.trace, "+-", h.trace_stderr, h.layers["conv1"].mean)
    lam = top_eigenvalue(model, loss_fn, batches, iters=100)
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from fastmask import masks as masks_module
from fastmask.evaluation import DEFAULT_BATCH_SIZE, Batches
from fastmask.ops.hutchinson import accumulate_probes, rademacher_probes

__all__ = ["HessianDiag", "LayerSummary", "hessian_diag", "top_eigenvalue"]

# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerSummary:
    """The Hessian diagonal over one module's parameters (unpruned entries only)."""

    parameters: tuple[str, ...]
    num_entries: int
    total: float          # sum of the diagonal: this layer's part of the trace
    mean: float
    max: float
    mass_fraction: float  # total / the sum over all layers


@dataclass(frozen=True)
class HessianDiag:
    """A Hutchinson estimate of the Hessian diagonal of the mean loss.

    ``diag`` and ``stderr`` map each trainable parameter's name to a tensor of its shape (float32,
    or float64 for float64 models; 0 at pruned entries). ``layers`` maps each module that owns
    trainable parameters (its qualified name; ``""`` for the root module) to a ``LayerSummary``.
    """

    diag: dict[str, Tensor]
    stderr: dict[str, Tensor]
    trace: float
    trace_stderr: float
    num_probes: int
    num_entries: int  # unpruned entries probed
    diag_mean: float
    diag_max: float
    layers: dict[str, LayerSummary]

    def __repr__(self) -> str:  # the scalars, never the diagonal's tensors
        return (f"HessianDiag(trace {self.trace:.4g} ± {self.trace_stderr:.2g}, {self.num_probes} probes, "
                f"{self.num_entries} entries, diag mean {self.diag_mean:.3g}, max {self.diag_max:.3g}, "
                f"{len(self.layers)} layers)")

    def summary(self) -> dict:
        """The scalars stored in a run's ``results.json``."""
        return {"trace": self.trace, "trace_stderr": self.trace_stderr, "diag_mean": self.diag_mean,
                "diag_max": self.diag_max, "num_probes": self.num_probes}


# ----------------------------------------------------------------------------- the operator


class _MeanLossHessian:
    """The Hessian of the mean loss over all of ``data`` with respect to the trainable parameters,
    applied to flat vectors: ``apply(v)`` maps [P, n] to [P, n], entries in ``named_parameters``
    order. The model must already be in eval mode.

    The ways to form the products, tried in order on the first batch (the next one where a mode
    fails for some op of the model), the order chosen by a fixed rule so that a rerun gives the
    same numbers (a timed choice could flip between runs):

    - ``double-backward``: the gradient's graph built once per batch (one forward and one backward
      with ``create_graph``), then one double backward per probe: the loop researchers write
      (PyHessian), without their host sync per probe. First on the CPU for models of at least
      ``CPU_DOUBLE_BACKWARD_ENTRIES`` trainable entries: for ConvNet-3 width 128 on digits (32
      probes, one thread; A/B under load) it was 2.5x faster than vmap, which adds batched
      elementwise work (normalisation double backward, mask multiplies) while batching the
      convolutions gains little; for tiny models vmap wins (the loop's cost is then Python's);
    - ``forward-over-reverse``: ``torch.func`` vmap over ``jvp(grad)`` (as curvlinops): every probe
      of a batch in one product; first on CUDA (not measured there), where batching fills the
      device, and for small models on the CPU;
    - ``reverse-over-reverse``: vmap over ``vjp(grad)``, for ops without forward-mode AD.
    ``torch.autograd.grad(..., is_grads_batched=True)`` is not a mode: its legacy vmap fails on
    ConvNet-3's ops (torch 2.13).
    """

    VMAP_MODES = ("forward-over-reverse", "reverse-over-reverse", "double-backward")
    DOUBLE_BACKWARD_MODES = ("double-backward", "forward-over-reverse", "reverse-over-reverse")
    # trainable entries from which the CPU forms products by double backward: measured (one
    # thread, under load) at ~100 entries vmap was 10x faster per probe, at 298,506 (ConvNet-3
    # width 128) double backward 2.5x; the crossover between is not measured
    CPU_DOUBLE_BACKWARD_ENTRIES = 10_000

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Iterable):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(f"model: parameters on several devices {sorted(map(str, devices))}")
        for name, p in named:
            if not p.is_floating_point():
                raise TypeError(f"model: parameter {name!r} is {p.dtype}; need a real floating dtype")
        nonfinite = [name for name, p in named if not torch.isfinite(p).all()]
        if nonfinite:
            raise ValueError(f"model: parameters with NaN or Inf: {nonfinite}")
        self.model, self.loss_fn = model, loss_fn
        self.device = devices.pop()
        # every probe batch passes over all of the data (a one-shot iterator is kept)
        self.data = Batches(data, self.device, DEFAULT_BATCH_SIZE, name="data", class_targets=False)
        self.names = [name for name, _ in named]
        self.params = {name: p.detach() for name, p in named}
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n = sum(self.numels)
        # statistics in float32 at least: one bf16 rounding per probe would swamp the mean
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in named) else torch.float32
        found = masks_module.by_parameter(model)
        masks = [found.get(p) for _, p in named]
        self.mask = None
        if any(m is not None for m in masks):
            self.mask = torch.cat([(torch.ones_like(p, dtype=torch.bool) if m is None else m).reshape(-1)
                                   for (_, p), m in zip(named, masks)])
        double_backward = self.device.type == "cpu" and self.n >= self.CPU_DOUBLE_BACKWARD_ENTRIES
        self.modes = self.DOUBLE_BACKWARD_MODES if double_backward else self.VMAP_MODES
        self.mode = None  # the first of self.modes that works on the first batch

    def unflatten(self, flat: Tensor, copy: bool = False) -> dict[str, Tensor]:
        """[..., n] -> {name: [..., *shape]}: views of ``flat``, or separate tensors with ``copy``."""
        pieces = torch.split(flat, self.numels, dim=-1)
        return {name: piece.unflatten(-1, shape).clone() if copy else piece.unflatten(-1, shape)
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def _batch_loss(self, params: dict[str, Tensor], inputs, targets) -> Tensor:
        """The batch's summed loss (batch size * its mean loss) at ``params``."""
        loss = self.loss_fn(functional_call(self.model, params, (inputs,)), targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn: must return the mean loss as a scalar tensor")
        return loss * inputs.shape[0]

    def _double_backward_products(self, inputs, targets, vectors: Tensor) -> Tensor:
        """batch size * H_batch v for each row v of ``vectors`` [P, n], as [P, n] in ``self.dtype``:
        the gradient's graph built once, one double backward per row."""
        leaves = [self.params[name].requires_grad_() for name in self.names]  # detached copies: ours to mark
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(self._batch_loss(dict(zip(self.names, leaves)), inputs, targets), leaves,
                                            create_graph=True, allow_unused=True, materialize_grads=True)
                live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient: H is 0 there
                out = vectors.new_zeros(vectors.shape)
                if not live:
                    return out
                for row, v in enumerate(vectors):
                    pieces = [p.view(shape).to(self.params[name].dtype)
                              for p, shape, name in zip(torch.split(v, self.numels), self.shapes, self.names)]
                    products = torch.autograd.grad([grads[i] for i in live], leaves,
                                                   grad_outputs=[pieces[i] for i in live],
                                                   retain_graph=row < len(vectors) - 1, allow_unused=True,
                                                   materialize_grads=True)
                    for piece, product in zip(torch.split(out[row], self.numels), products):
                        piece.copy_(product.reshape(-1))
                return out
        finally:
            for leaf in leaves:
                leaf.requires_grad_(False)

    def _batch_products(self, inputs, targets, vectors: Tensor, mode: str) -> Tensor:
        """batch size * H_batch v for each row v of ``vectors`` [P, n], as [P, n] in ``self.dtype``
        (H_batch: of this batch's mean loss)."""
        if mode == "double-backward":
            return self._double_backward_products(inputs, targets, vectors)
        tangents = {name: t.to(self.params[name].dtype) for name, t in self.unflatten(vectors).items()}

        def batch_loss(params):
            return self._batch_loss(params, inputs, targets)

        if mode == "forward-over-reverse":
            products = vmap(lambda v: jvp(grad(batch_loss), (self.params,), (v,))[1])(tangents)
        else:
            _, product = vjp(grad(batch_loss), self.params)  # one forward and backward, then P double backwards
            products = vmap(product)(tangents)[0]
        return torch.cat([products[name].reshape(len(vectors), -1).to(self.dtype) for name in self.names], dim=1)

    def _products(self, inputs, targets, vectors: Tensor) -> Tensor:
        if self.mode is None:  # the first batch chooses: the first mode that works
            self.mode, out = self._working_mode(inputs, targets, vectors, list(self.modes))
            return out
        return self._batch_products(inputs, targets, vectors, self.mode)

    def _working_mode(self, inputs, targets, vectors: Tensor, pending: list[str]) -> tuple[str, Tensor]:
        """(mode, products): the first of ``pending`` that works on this batch, with a warning for
        each that fails; the last one's error when none does."""
        for mode, fallback in zip(pending, pending[1:]):
            try:
                return mode, self._batch_products(inputs, targets, vectors, mode)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op without a double backward, a forward-mode derivative or a vmap rule
                warnings.warn(f"{mode} Hessian-vector products failed ({err}); using {fallback}",
                              RuntimeWarning, stacklevel=5)
        return pending[-1], self._batch_products(inputs, targets, vectors, pending[-1])

    def apply(self, vectors: Tensor) -> Tensor:
        """H v for each row v of ``vectors`` [P, n] (in ``self.dtype``), as [P, n] in ``self.dtype``."""
        total, samples = None, 0
        for inputs, targets in self.data:
            products = self._products(inputs, targets, vectors)
            total = products if total is None else total.add_(products)
            samples += inputs.shape[0]
        if samples == 0:
            raise ValueError("data: holds no samples")
        return total.div_(samples)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in eval mode for the block, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _ProbeBatcher:
    """Sizes of the successive probe batches.

    A given ``probe_batch`` is used as is; without one, the CPU takes as many probes as fit in
    ``CPU_PROBE_BYTES`` (``bytes_per_probe``: the probes, their products and a batch's products),
    at least ``CPU_PROBE_BATCH``: its double-backward products build the gradient's graph once per
    probe batch, so fewer batches cost fewer graphs. CUDA measures: the first two batches hold
    1 and 2 probes (real probes, nothing is wasted), their peak memory gives the cost of one more
    probe, and the rest go in batches that fill ``MEMORY_FRACTION`` of the free memory, at most
    ``CUDA_PROBE_BYTES``: on an H200 (ConvNet-3 width 128, batch 256, 64 probes) 8 probes at a
    time (9.7 GiB at the peak) ran at 0.95-1.00x the speed of all 64 at once (67 GiB). This
    resets CUDA's peak-memory statistics. Should a measured size still run out of memory, the
    batch is retried at half the size (``shrink``).
    """

    CPU_PROBE_BATCH = 16
    CPU_PROBE_BYTES = 1 << 28
    CUDA_PROBE_BYTES = 12 << 30
    MEMORY_FRACTION = 0.8

    def __init__(self, probe_batch: Optional[int], num_probes: int, device: torch.device, bytes_per_probe: int = 0):
        self.num_probes, self.device = num_probes, device
        self.automatic = probe_batch is None and device.type == "cuda"
        self.measuring = self.automatic
        self.size = probe_batch if probe_batch is not None else max(
            self.CPU_PROBE_BATCH, self.CPU_PROBE_BYTES // max(bytes_per_probe, 1))
        self.peaks: list[tuple[int, int]] = []  # (probes, peak bytes above the start)

    def next_size(self, done: int) -> int:
        remaining = self.num_probes - done
        if self.measuring and len(self.peaks) < 2:
            return min(len(self.peaks) + 1, remaining)
        return min(self.size, remaining)

    @contextlib.contextmanager
    def measure(self, size: int):
        if not (self.measuring and len(self.peaks) < 2):
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        yield
        self.peaks.append((size, torch.cuda.max_memory_allocated(self.device) - start))
        if len(self.peaks) == 2:
            self.size = self._fitting_size()

    def shrink(self, size: int) -> bool:
        """After a batch of ``size`` probes ran out of memory: whether to retry it smaller (only
        measured sizes are changed; a given ``probe_batch`` is the caller's to choose)."""
        if not self.automatic or size <= 1:
            return False
        self.measuring = False
        self.size = size // 2
        return True

    def _fitting_size(self) -> int:
        (p1, peak1), (p2, peak2) = self.peaks
        # The first batch may also hold one-time allocations (workspaces), and with 2 probes in all
        # both batches hold one: then the larger whole peak per probe.
        per_probe = (peak2 - peak1) / (p2 - p1) if peak2 > peak1 and p2 > p1 else max(peak1 / p1, peak2 / p2)
        fixed = max(peak1 - per_probe * p1, 0)
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = min(self.MEMORY_FRACTION * (free + cached) - fixed, self.CUDA_PROBE_BYTES)
        return max(1, int(budget // max(per_probe, 1)))


# ----------------------------------------------------------------------------- public API


def _check_int(name: str, value, low: int, high: Optional[int] = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}: must be {bound}, got {value}")


def _check_callables(model, loss_fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn: expected a callable loss_fn(outputs, targets)")


def _summarise(op: _MeanLossHessian, mean: Tensor) -> tuple[dict[str, LayerSummary], int, float, float]:
    """Per-module summaries of the flat diagonal ``mean`` over unpruned entries, and the overall
    number of entries, mean and max."""
    offsets = [0]
    for numel in op.numels:
        offsets.append(offsets[-1] + numel)
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(op.names):
        groups.setdefault(name.rpartition(".")[0], []).append(index)
    raw = {}
    for layer, indices in groups.items():
        values = torch.cat([mean[offsets[i]:offsets[i + 1]] for i in indices])
        if op.mask is not None:
            values = values[torch.cat([op.mask[offsets[i]:offsets[i + 1]] for i in indices])]
        count = values.numel()
        total = values.sum().item()
        raw[layer] = (tuple(op.names[i] for i in indices), count, total,
                      values.max().item() if count else math.nan)
    grand_total = sum(total for _, _, total, _ in raw.values())
    num_entries = sum(count for _, count, _, _ in raw.values())
    layers = {layer: LayerSummary(parameters=names, num_entries=count, total=total,
                                  mean=total / count if count else math.nan, max=largest,
                                  mass_fraction=total / grand_total if grand_total else math.nan)
              for layer, (names, count, total, largest) in raw.items()}
    maxima = [s.max for s in layers.values() if s.num_entries]
    return (layers, num_entries, grand_total / num_entries if num_entries else math.nan,
            max(maxima) if maxima else math.nan)


def hessian_diag(model: nn.Module, loss_fn: Callable, data: Iterable, num_probes: int = 100,
                 probe_batch: Optional[int] = None, seed: int = 0, progress: bool = False,
                 description: str = "hessian probes") -> HessianDiag:
    """Hutchinson estimate of the diagonal of the Hessian of the mean loss over all of ``data``.

    Args:
        model: any ``nn.Module``, in any floating dtype (statistics kept in float32, or float64
            for float64 models). Put in eval mode for the computation, its modes restored after.
        loss_fn: ``loss_fn(outputs, targets)`` -> the mean loss of a batch (a scalar tensor).
        data: an iterable of ``(inputs, targets)`` batches, or a fastmask ``Dataset`` (cut into
            batches of 1024), iterated once per probe batch (``fastmask.evaluation.Batches``: a
            one-shot iterator is first gathered into a list). Batches are weighted by their size
            and moved to the model's device.
        num_probes: Rademacher probes, at least 2 (the standard errors need two).
        probe_batch: probes per Hessian-vector product; by default chosen to fit the free GPU
            memory on CUDA, on the CPU as many as fit in 256 MiB, at least 16 (see
            ``_ProbeBatcher``). Does not change the probes.
        seed: the generator's key, in [0, 2^63). The same seed gives the same probes.
        progress: a progress bar over the probes, labelled ``description``.

    Returns:
        ``HessianDiag``: per-entry ``diag`` and ``stderr`` (sqrt(sample variance / num_probes)),
        ``trace`` (mean over probes of the sum of z * Hz over unpruned entries) and its
        ``trace_stderr``, overall and per-layer summaries.

    Example::

        h = hessian_diag(model, torch.nn.functional.cross_entropy, [(x, y)], num_probes=64)
        h.diag["fc.weight"], h.trace, h.trace_stderr, h.layers["fc"].mass_fraction
    """
    _check_callables(model, loss_fn)
    _check_int("num_probes", num_probes, 2, 1 << 32)
    if probe_batch is not None:
        _check_int("probe_batch", probe_batch, 1)
    _check_int("seed", seed, 0, 1 << 63)
    with _eval_mode(model), torch.no_grad():
        op = _MeanLossHessian(model, loss_fn, data)
        batcher = _ProbeBatcher(probe_batch, num_probes, op.device,
                                bytes_per_probe=3 * op.n * op.dtype.itemsize)
        mean = torch.zeros(op.n, dtype=op.dtype, device=op.device)
        m2 = torch.zeros_like(mean)
        probe_values = []
        done = 0
        with tqdm(total=num_probes, desc=description, disable=not progress, leave=False) as bar:  # closed on errors too
            while done < num_probes:
                size = batcher.next_size(done)
                try:
                    with batcher.measure(size):
                        z = rademacher_probes(seed, done, size, op.n, op.mask, op.dtype, op.device)
                        hz = op.apply(z)
                        # new tensors: an allocation failure here leaves mean and m2 as they were
                        mean, m2, sums = accumulate_probes(z, hz, done, mean, m2)
                        del z, hz
                except torch.cuda.OutOfMemoryError:
                    if not batcher.shrink(size):
                        raise
                    continue  # the same probes again, fewer at a time
                probe_values.append(sums)
                done += size
                bar.update(size)
        values = torch.cat(probe_values)
        if not torch.isfinite(values).all():
            raise ValueError("data: the Hessian-vector products are not finite (NaN or Inf in data, "
                             "loss_fn or the model's outputs)")
        # M2 is a sum of squares; Chan's merge can leave it a rounding below 0
        stderr = (m2.clamp_min(0) / ((num_probes - 1) * num_probes)).sqrt()
        layers, num_entries, diag_mean, diag_max = _summarise(op, mean)
        # separate tensors, not views of one buffer: safetensors refuses to save shared storage
        return HessianDiag(diag=op.unflatten(mean, copy=True), stderr=op.unflatten(stderr, copy=True),
                           trace=values.mean().item(),
                           trace_stderr=(values.std() / math.sqrt(num_probes)).item(), num_probes=num_probes,
                           num_entries=num_entries, diag_mean=diag_mean, diag_max=diag_max, layers=layers)


def top_eigenvalue(model: nn.Module, loss_fn: Callable, data: Iterable, iters: int = 100, tol: float = 1e-4,
                   seed: int = 0, return_vector: bool = False):
    """The eigenvalue of largest magnitude of the Hessian of the mean loss, by power iteration on
    Hessian-vector products (restricted to unpruned entries for masked models).

    Starts from the Rademacher probe 0 of ``seed`` (normalised); each step takes the Rayleigh
    quotient v^T H v and v <- Hv / |Hv|; stops when the quotient changes by at most ``tol`` times
    its magnitude, or after ``iters`` products. ``model``, ``loss_fn`` and ``data`` are as in
    ``hessian_diag``.

    Returns the eigenvalue (a float), or ``(eigenvalue, vector)`` with ``return_vector``: the
    unit eigenvector as {parameter name: tensor}.

    Example::

        lam = top_eigenvalue(model, torch.nn.functional.cross_entropy, [(x, y)], iters=50)
    """
    _check_callables(model, loss_fn)
    _check_int("iters", iters, 1)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol: must be a number >= 0, got {tol!r}")
    _check_int("seed", seed, 0, 1 << 63)
    with _eval_mode(model), torch.no_grad():
        op = _MeanLossHessian(model, loss_fn, data)
        v = rademacher_probes(seed, 0, 1, op.n, op.mask, op.dtype, op.device)
        v /= v.norm()
        value = None
        for _ in range(iters):
            hv = op.apply(v)
            if op.mask is not None:
                hv.mul_(op.mask)
            quotient = (v * hv).sum().item()
            norm = hv.norm()
            if not math.isfinite(quotient):
                raise ValueError("data: the Hessian-vector products are not finite (NaN or Inf in data, "
                                 "loss_fn or the model's outputs)")
            if norm == 0:  # v is in the null space: H restricted to the probed entries may be 0
                value = 0.0
                break
            v = hv / norm
            converged = value is not None and abs(quotient - value) <= tol * abs(quotient)
            value = quotient
            if converged:
                break
        if return_vector:
            return value, op.unflatten(v[0], copy=True)
        return value
