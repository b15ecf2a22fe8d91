"""Hutchinson estimator kernels: Rademacher probes from a counter-based generator, and the fused
accumulation of z * Hz into running per-entry statistics.

- ``rademacher``: probe ``p``'s entry ``e`` is the sign given by bit ``e mod 32`` of word
  ``(e div 32) mod 4`` of the Philox4x32-10 draw keyed by the seed at the counter
  (c mod 2^32, c div 2^32, p, 0), ``c = e div 128``: every bit of a draw is used, so the torch
  reference (which cannot afford one draw per entry on a CPU) computes a draw per 128 entries. A
  probe depends only on (seed, p), never on how the probes are split into launches, so any
  ``probe_batch`` gives the same probes. Pruned entries (mask 0) are exactly 0.
- ``welford_update``: for a batch z, Hz [P, n] it forms x = z * Hz, the batch's per-entry mean and
  sum of squared deviations (Welford over the P rows), merges them into the running (count, mean,
  M2) with Chan's parallel rule, and writes each probe's partial sum of x per block of entries
  (summed on the host side into the per-probe trace values, in a fixed order: deterministic).
  One read of z and Hz, one read and write of the statistics.

The torch references of both (bit-identical probes, the same statistics up to rounding) are in
``fastmask.hessian``.
"""
import torch
import triton
import triton.language as tl

from . import _alloc

BLOCK = 1024
MAX_PROBES_PER_LAUNCH = 65535  # the grid's second axis


# seed and first_probe take a new value at every call (Hutchinson's probe batches, top_eigenvalue's
# seeds): not specialised on, so that one compiled variant serves them all.
@triton.jit(do_not_specialize=["seed", "first_probe"])
def rademacher_kernel(out_ptr, mask_ptr, seed, first_probe, n, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    counter = offs >> 7  # 128 entries per draw: four 32-bit words
    counter_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    counter_hi = (counter >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    probe = zero + (first_probe + row).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, counter_lo, counter_hi, probe, zero)
    word_index = (offs >> 5) & 3
    word = tl.where(word_index == 0, w0, tl.where(word_index == 1, w1, tl.where(word_index == 2, w2, w3)))
    bit = (word >> (offs & 31).to(tl.uint32)) & 1
    sign = tl.where(bit == 0, 1.0, -1.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=valid, other=0)
        sign = tl.where(keep != 0, sign, 0.0)
    tl.store(out_ptr + row.to(tl.int64) * n + offs, sign.to(out_ptr.dtype.element_ty), mask=valid)


def rademacher(seed: int, first_probe: int, num_probes: int, n: int, mask, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Probes ``first_probe .. first_probe + num_probes - 1`` as a [num_probes, n] tensor of +-1
    (0 where the boolean ``mask`` [n] is False)."""
    out = _alloc.empty((num_probes, n), dtype=dtype, device=device)
    mask_bytes = out if mask is None else mask.view(torch.uint8)
    for start in range(0, num_probes, MAX_PROBES_PER_LAUNCH):
        rows = min(MAX_PROBES_PER_LAUNCH, num_probes - start)
        grid = (triton.cdiv(n, BLOCK), rows)
        rademacher_kernel[grid](out[start:], mask_bytes, seed, first_probe + start, n,
                                HAS_MASK=mask is not None, BLOCK=BLOCK, num_warps=4)
    return out


# num_probes is 1, then 2, then the measured batch (fastmask.hessian): not specialised on either.
@triton.jit(do_not_specialize=["num_probes"])
def welford_update_kernel(z_ptr, hz_ptr, mean_ptr, m2_ptr, new_mean_ptr, new_m2_ptr, probe_sums_ptr,
                          n, num_probes, weight_batch, weight_cross, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    acc_dtype = mean_ptr.dtype.element_ty
    batch_mean = tl.zeros([BLOCK], dtype=acc_dtype)
    batch_m2 = tl.zeros([BLOCK], dtype=acc_dtype)
    z_row = z_ptr + offs  # pointers advance by whole rows: 64-bit, no index overflow at P * n > 2^31
    hz_row = hz_ptr + offs
    for p in range(num_probes):
        x = tl.load(z_row, mask=valid, other=0).to(acc_dtype) * tl.load(hz_row, mask=valid, other=0).to(acc_dtype)
        tl.store(probe_sums_ptr + block * num_probes + p, tl.sum(x, axis=0))
        delta = x - batch_mean
        batch_mean += delta / (p + 1)
        batch_m2 += delta * (x - batch_mean)
        z_row += n
        hz_row += n
    mean = tl.load(mean_ptr + offs, mask=valid, other=0)
    m2 = tl.load(m2_ptr + offs, mask=valid, other=0)
    delta = batch_mean - mean
    tl.store(new_mean_ptr + offs, mean + delta * weight_batch, mask=valid)
    tl.store(new_m2_ptr + offs, m2 + batch_m2 + delta * delta * weight_cross, mask=valid)


def welford_update(z: torch.Tensor, hz: torch.Tensor, count: int, mean: torch.Tensor, m2: torch.Tensor):
    """Merge the P samples x = z * Hz ([P, n] each) into running statistics of ``count`` samples.

    Returns (mean, M2, probe_sums): the new [n] statistics in ``mean``'s dtype and the [P] sums of x.
    """
    num_probes, n = z.shape
    z, hz = z.contiguous(), hz.contiguous()
    blocks = triton.cdiv(n, BLOCK)
    new_mean = _alloc.empty_like(mean)
    new_m2 = _alloc.empty_like(m2)
    partial_sums = _alloc.empty((blocks, num_probes), dtype=mean.dtype, device=mean.device)
    total = count + num_probes
    welford_update_kernel[(blocks,)](z, hz, mean, m2, new_mean, new_m2, partial_sums, n, num_probes,
                                     num_probes / total, count * num_probes / total, BLOCK=BLOCK, num_warps=4)
    return new_mean, new_m2, partial_sums.sum(dim=0)
