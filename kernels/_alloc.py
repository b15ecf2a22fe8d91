"""Output allocation for the kernels, poisoned on demand so tests see unwritten elements."""
import contextlib

import torch

_poison = False


@contextlib.contextmanager
def poisoned():
    """Within this block kernel outputs start as NaN (floats) or -1 (integers) instead of garbage."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(*shape, **kwargs) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; filled with poison inside ``poisoned()``."""
    out = torch.empty(*shape, **kwargs)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(t, **kwargs)
    if _poison:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
