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

How it runs: ``fastmask.combinations``' engine, with the alphas as the combinations
``(1 - alpha, alpha)`` of the two models: the two become one ``fastmask.stack.Stack``, a chunk of
K alphas runs as one stack of K networks, and each batch goes once through all of them, so the
data is read once per chunk. On CUDA (or with ``FASTMASK_BACKEND=triton``) the conv and linear
layers run ``ops.interpolated_masked_conv2d`` / ``ops.interpolated_masked_linear``, which form the
K interpolated masked weights inside the kernels' tile loads from one copy of each model;
elsewhere the K weight sets are materialised and the stacked ops run. Chunk sizes, and models that
do not stack (evaluated one alpha at a time, with a warning): see ``fastmask.combinations``.

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
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastmask import backend, masks as masks_module
from fastmask.combinations import StackFallbackWarning, aligned_sources, check_models, evaluate_combinations
from fastmask.data import DataSplits
from fastmask.evaluation import LossFn
from fastmask.stack import Stack

__all__ = ["InterpolationResult", "InstabilityResult", "interpolate", "instability", "alpha_grid", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = 30  # evenly spaced, endpoints included (Frankle et al., 2020)


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

    def __repr__(self) -> str:
        return (f"InterpolationResult({len(self.alphas)} alphas, barrier: error {100 * self.barrier_error:.2f}%, "
                f"loss {self.barrier_loss:.4f}; error at the ends {100 * self.error[0]:.2f}% / "
                f"{100 * self.error[-1]:.2f}%{', BN reset' if self.bn_reset else ''})")

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

    def __repr__(self) -> str:  # the barriers, never the models' weights
        reset = "" if self.test_reset is None else (f"; BN reset test error {100 * self.test_reset.barrier_error:.2f}%")
        return (f"InstabilityResult(barrier: test error {100 * self.test.barrier_error:.2f}%, test loss "
                f"{self.test.barrier_loss:.4f}, train error {100 * self.train.barrier_error:.2f}%{reset})")


# ----------------------------------------------------------------------------- alphas


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


# ----------------------------------------------------------------------------- public API


def interpolate(model_a: nn.Module, model_b: nn.Module, alphas=DEFAULT_ALPHAS, data=None,
                loss_fn: Optional[LossFn] = None, bn_reset_data=None, *, batch_size: Optional[int] = None,
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
    check_models([model_a, model_b], ["model_a", "model_b"])
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
                bn_reset: bool = False, progress: bool = False, description: str = "instability") -> InstabilityResult:
    """Instability to SGD noise (Frankle et al., 2020): train two copies of ``model`` from the same
    weights and mask with different data orders and augmentation, then interpolate them.

    Args:
        model: the architecture (a fastmask model, or one ``fastmask.sparsify`` made masked when
            ``masks`` is given); not modified.
        masks: ``{"<module>.weight": mask}`` as ``fastmask.masks.of`` gives them, or None (as is).
        rewind_weights: the state_dict both copies start from (e.g. IMP's rewind point), or None
            for ``model``'s current weights.
        data: ``fastmask.data.DataSplits``; training on ``data.train``, interpolation on train and test.
        train_cfg: a ``fastmask.train.TrainConfig``.
        seeds: the two copies' data-order and augmentation seeds; both train as one stack of 2.
        alphas: as ``interpolate``.
        bn_reset: also interpolate with BatchNorm statistics recomputed on ``data.train``.
        progress, description: progress bars, and the training bar's label (e.g. the network's name).

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
        masks_module.apply(start, masks)
    pair = Stack([start, start])
    fit(pair, data.train, train_cfg, seed=seeds, progress=progress, description=description)
    model_a, model_b = pair.split()
    runs = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        runs[split] = interpolate(model_a, model_b, values, dataset, progress=progress)
        if bn_reset:
            runs[f"{split}_reset"] = interpolate(model_a, model_b, values, dataset, bn_reset_data=data.train,
                                                 progress=progress)
    return InstabilityResult((model_a, model_b), **runs)
