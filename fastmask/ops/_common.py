"""What the op wrappers share: argument checks, the autocast rule and the per-shape dispatch.

Private to ``fastmask.ops``; the public functions are in ``masked_conv`` and ``masked_linear``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from fastmask import backend
from fastmask.masks import check as check_mask


# ----------------------------------------------------------------------------- validation


def _check_float(name: str, t: Tensor):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_devices(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {listed}")


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return value


def _conv_padding(padding, kernel: tuple[int, int], stride, dilation) -> list[int]:
    """Padding as (top, bottom, left, right); 'same' splits odd totals like torch (extra at the end)."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in torch.nn.functional.conv2d)")
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {(ph, pw)}")
    return [ph, ph, pw, pw]


def _conv_geometry(kernel: tuple[int, int], stride, padding, dilation) -> tuple:
    """(stride pair, (top, bottom, left, right), dilation pair), checked: errors name the argument."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    return stride, _conv_padding(padding, kernel, stride, dilation), dilation


def _autocast(*tensors: Optional[Tensor]):
    """Cast floating inputs to the CUDA autocast dtype, as F.conv2d / F.linear would under autocast."""
    if tensors[0].is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    return list(tensors)


# ----------------------------------------------------------------------------- dispatch


_fastest: dict[tuple, str] = {}


def _pick(key: tuple, candidates: dict[str, Callable[[], Tensor]]) -> Callable[[], Tensor]:
    """The Triton kernel when forced; on CUDA under 'auto', whichever of the candidates is faster
    for this shape, timed once (CUDA events, after a warm-up that also autotunes) and cached."""
    if backend.selected() != "auto" or not torch.cuda.is_available():
        return candidates["triton"]
    if key not in _fastest:
        if torch.cuda.is_current_stream_capturing():
            return candidates["torch"]
        times = {}
        for name, fn in candidates.items():
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end)
        _fastest[key] = min(times, key=times.get)
    return candidates[_fastest[key]]


def _chosen_torch(key: tuple, decide: Callable[[], object]) -> Optional[str]:
    """The torch candidate ``_pick`` chose for ``key``, when the caller may run it as plain torch
    ops instead of calling its custom op; else None. Only eager code under ``auto`` does:
    torch.compile must see the op. Through a custom op and its autograd wrapper, one masked conv's
    forward and backward cost 0.5-1 ms more host time than the same torch ops (measured: on the
    H200's host fastmask took 1.25-1.37 ms at every headline conv shape where cuDNN's own work took
    0.34-1.38 ms; on this 2-core CPU at a tiny shape 918 against 394 us), and autograd through the
    torch ops computes the same gradients.

    A shape not decided yet is decided first (outside a CUDA graph's capture), by one call of
    ``decide`` (its custom op, without autograd, whose result is dropped): so every call of a
    shape, the first too, takes one path. A first call through the op and later ones through the
    plain ops round differently (op: a re-laid-out output, the bias gradient summed apart); on an
    H200, two trainings of one seed in one process then differed by 6e-5 to 9e-3 after 9 steps.
    """
    if torch.compiler.is_compiling() or backend.selected() != "auto":
        return None
    if key not in _fastest and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        with torch.no_grad():
            decide()
    choice = _fastest.get(key)
    return None if choice in (None, "triton") else choice


def _off_kernel_ground(*tensors: Tensor) -> bool:
    """Whether an op on ``tensors`` can only run as plain torch ops (CPU, float64, functorch,
    ``FASTMASK_BACKEND=torch``): decided without the stacked form's argument checks."""
    return torch._C._are_functorch_transforms_active() or not backend.use_triton(*tensors)


def _plain_or_named_error(plain: Callable[[], Tensor], check: Callable[[], object]) -> Tensor:
    """``plain()``, the op as plain torch ops, with the op's argument checks (``check``) run only
    when torch refuses the arguments, so that the error names the argument. On the CPU those checks
    cost about 40 us per call, 40% of a small convolution (measured: 146-159 against 82-107 us for
    ``F.conv2d(x, w * m)`` at 2 x 4 x 6 x 6, one thread). torch refuses the rest of what they
    refuse, except devices (a meta tensor passes), a linear bias it would broadcast, and the conv's
    stride / padding / dilation forms, which the callers check first."""
    try:
        return plain()
    except Exception:
        check()  # raises the named error where the arguments are at fault
        raise


def _allow_tf32_conv() -> bool:
    return torch.backends.cudnn.allow_tf32


def _allow_tf32_matmul() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _key(*tensors: Tensor, extra=()) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors) + tuple(extra)


def _one_batch_if_expanded(x: Tensor) -> Tensor:
    """A stack's input expanded over its K models (model stride 0, ``Stack(x, shared=True)``) as the
    one shared batch ``[1, ...]`` it is: the shared-input paths then read it once, and an autocast
    cast copies one batch, not K."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x



# ----------------------------------------------------------------------------- interpolated (multi-alpha) forms


def interpolate_weights(weight_a: Tensor, weight_b: Tensor, alphas: Tensor) -> Tensor:
    """``[K, ...]``: ``(1 - alphas[k]) * weight_a + alphas[k] * weight_b`` for ``weight_a`` / ``weight_b``
    of one shape ``[1, ...]``, computed in at least float32 and returned in ``weight_a``'s dtype.

    The kernels form exactly this in their tile loads; it is exact at alpha 0 and 1.
    """
    compute = torch.promote_types(weight_a.dtype, torch.float32)
    a = alphas.to(compute).view(-1, *([1] * (weight_a.dim() - 1)))
    return ((1 - a) * weight_a.to(compute) + a * weight_b.to(compute)).to(weight_a.dtype)



def _laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``like``'s strides (copied only when they differ): the kernels address both with one set."""
    if t.stride() == like.stride():
        return t
    return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device).copy_(t)



def _interpolation_args(weight_a: Tensor, weight_b: Tensor, mask: Tensor, alphas, bias_a: Optional[Tensor],
                        bias_b: Optional[Tensor], dims: int, layout: str) -> tuple[Tensor, Tensor]:
    """Checks shared by the interpolated conv and linear; returns (boolean mask, alphas as a 1-d tensor)."""
    _check_float("weight_a", weight_a)
    _check_float("weight_b", weight_b)
    if weight_a.dim() != dims:
        raise ValueError(f"weight_a must be {layout} ({dims}-d), got shape {tuple(weight_a.shape)}")
    if weight_b.shape != weight_a.shape or weight_b.dtype != weight_a.dtype:
        raise ValueError(f"weight_b ({tuple(weight_b.shape)}, {weight_b.dtype}) must match weight_a "
                         f"({tuple(weight_a.shape)}, {weight_a.dtype})")
    alphas = torch.as_tensor(alphas, device=weight_a.device)  # a list, or a tensor brought to the weights' device
    if alphas.dim() != 1 or alphas.numel() == 0 or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a non-empty 1-d floating tensor, got {alphas.dtype} of shape "
                         f"{tuple(alphas.shape)}")
    if (bias_a is None) != (bias_b is None):
        raise ValueError("bias_a and bias_b must be given together (or neither)")
    for name, bias in (("bias_a", bias_a), ("bias_b", bias_b)):
        if bias is not None and tuple(bias.shape) != (weight_a.shape[0],):
            raise ValueError(f"{name} must have shape {(weight_a.shape[0],)}, got {tuple(bias.shape)}")
    return check_mask(mask, weight_a.shape), alphas
