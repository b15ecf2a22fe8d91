"""Hutchinson's estimator, the wrapper of ``fastmask.kernels.hutchinson``: Rademacher probes drawn
from a counter-based generator, and the fused accumulation of z * Hz into running per-entry
statistics (``fastmask.hessian`` builds the Hessian-diagonal estimate on them).

Probes come from Philox4x32-10 keyed by the seed, so probe p is the same whatever the batching and
whatever the backend: the torch references below draw bit-identical probes with 64-bit integer
ops, and the kernels are tested for equality. Both ops are ``torch.library`` custom ops, chosen
over their references by ``fastmask.backend`` (CUDA tensors, or ``FASTMASK_BACKEND=triton``).

Example::

    from fastmask.ops import hutchinson
    z = hutchinson.rademacher_probes(seed=0, first_probe=0, num_probes=4, n=10)      # [4, 10] of +-1
    mean, m2, sums = hutchinson.accumulate_probes(z, hz, 0, torch.zeros(10), torch.zeros(10))
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastmask import backend

__all__ = ["philox4x32", "rademacher_probes", "rademacher_probes_reference", "accumulate_probes",
           "accumulate_probes_reference"]


# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011), the
# generator of triton's tl.philox. The reference draws the same bits with 64-bit integer torch
# ops so that the CPU path and the kernels agree probe for probe: results do not depend on the
# backend, and the kernel is tested for equality, not for distribution.
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_UINT32 = 0xFFFFFFFF
BITS_PER_WORD = 32
ENTRIES_PER_DRAW = 4 * BITS_PER_WORD  # every bit of a draw's four words is a probe entry
_REFERENCE_CHUNK = 1 << 22  # probe entries per step of the reference generator (bounds its memory)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product a * b (uint32 values held in int64), computed
    on 16-bit halves so that no intermediate overflows int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    middle = a_hi * b_lo + a_lo * b_hi + (low >> 16)
    return a_hi * b_hi + (middle >> 16), ((middle & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with key (seed mod 2^32, seed div 2^32) on counters c0..c3 (int64 tensors or
    ints holding uint32 values; they broadcast). Returns four int64 tensors of uint32 values,
    equal to triton's ``tl.philox(seed, c0, c1, c2, c3)``."""
    k0, k1 = seed & _UINT32, (seed >> 32) & _UINT32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _UINT32, (k1 + PHILOX_KEY_B) & _UINT32
    return c0, c1, c2, c3


def rademacher_probes_reference(seed: int, first_probe: int, num_probes: int, n: int,
                                mask: Optional[Tensor] = None, dtype: torch.dtype = torch.float32,
                                device="cpu") -> Tensor:
    """Probes ``first_probe .. first_probe + num_probes - 1``, [num_probes, n]: entry e of probe p
    is +1 or -1 by bit ``e mod 32`` of word ``(e div 32) mod 4`` of
    ``philox4x32(seed, c mod 2^32, c div 2^32, p, 0)`` with ``c = e div 128`` (one draw gives 128
    entries: all its bits are used), and 0 where the boolean ``mask`` [n] is False. The torch
    reference of ``rademacher_probes``."""
    out = torch.empty((num_probes, n), dtype=dtype, device=device)
    probes = torch.arange(first_probe, first_probe + num_probes, dtype=torch.int64, device=device)[:, None]
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int64, device=device)
    step = max(1, _REFERENCE_CHUNK // (num_probes * ENTRIES_PER_DRAW))  # counters per step
    counters = -(-n // ENTRIES_PER_DRAW)
    for start in range(0, counters, step):
        counter = torch.arange(start, min(counters, start + step), dtype=torch.int64, device=device)[None, :]
        words = torch.stack(philox4x32(seed, counter & _UINT32, counter >> 32, probes, 0), dim=-1)  # [P, c, 4]
        bits = (words[..., None] >> shifts) & 1  # [P, c, 4, 32]
        first = start * ENTRIES_PER_DRAW
        last = min(n, first + bits[0].numel())
        out[:, first:last] = (1 - 2 * bits.flatten(1))[:, :last - first]
    if mask is not None:
        out.mul_(mask)
    return out


@torch.library.custom_op("fastmask::rademacher_probes", mutates_args=())
def _rademacher_op(seed: int, first_probe: int, num_probes: int, n: int, mask: Optional[Tensor], dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    from fastmask.kernels import hutchinson

    return hutchinson.rademacher(seed, first_probe, num_probes, n, mask, dtype, device)


@_rademacher_op.register_fake
def _(seed, first_probe, num_probes, n, mask, dtype, device):
    return torch.empty((num_probes, n), dtype=dtype, device=device)


def rademacher_probes(seed: int, first_probe: int, num_probes: int, n: int, mask: Optional[Tensor] = None,
                      dtype: torch.dtype = torch.float32, device="cpu") -> Tensor:
    """Rademacher probes ``first_probe .. first_probe + num_probes - 1`` as [num_probes, n], 0 where
    ``mask`` is False: the Triton kernel or the bit-identical torch reference (``fastmask.backend``)."""
    device = torch.device(device)
    if backend.use_triton(torch.empty(0, dtype=dtype, device=device)):
        return _rademacher_op(seed, first_probe, num_probes, n, mask, dtype, device)
    return rademacher_probes_reference(seed, first_probe, num_probes, n, mask, dtype, device)


def accumulate_probes_reference(z: Tensor, hz: Tensor, count: int, mean: Tensor, m2: Tensor):
    """Merge the samples x = z * Hz (rows of [P, n]) into running statistics of ``count`` samples
    per entry (``mean``, ``m2`` = sum of squared deviations, [n]) by Chan's parallel rule.
    Returns (mean, m2, probe_sums [P]). The torch reference of ``accumulate_probes``."""
    x = z.to(mean.dtype) * hz.to(mean.dtype)
    num_probes = x.shape[0]
    batch_mean = x.mean(dim=0)
    batch_m2 = (x - batch_mean).square_().sum(dim=0)
    total = count + num_probes
    delta = batch_mean - mean
    return (mean + delta * (num_probes / total), m2 + batch_m2 + delta.square() * (count * num_probes / total),
            x.sum(dim=1))



@torch.library.custom_op("fastmask::accumulate_probes", mutates_args=())
def _accumulate_op(z: Tensor, hz: Tensor, count: int, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from fastmask.kernels import hutchinson

    return hutchinson.welford_update(z, hz, count, mean, m2)


@_accumulate_op.register_fake
def _(z, hz, count, mean, m2):
    return torch.empty_like(mean), torch.empty_like(m2), mean.new_empty(z.shape[0])


def accumulate_probes(z: Tensor, hz: Tensor, count: int, mean: Tensor, m2: Tensor):
    """``accumulate_probes_reference`` fused into one pass over z and Hz on the Triton path."""
    if backend.use_triton(z, hz, mean, m2, kernel_dtypes=(torch.float32,)):
        return _accumulate_op(z, hz, count, mean, m2)
    return accumulate_probes_reference(z, hz, count, mean, m2)
