"""Fused masked SGD and AdamW steps: one launch updates every parameter tensor of a param group.

Design: a multi-tensor kernel over a table of raw addresses.

- ``TensorTable`` holds one int64 row per parameter tensor: the addresses of the parameter, its
  gradient, its optimizer state (momentum buffer, or exp_avg and exp_avg_sq), its boolean mask (0
  for a dense tensor) and its element count. A second table maps each program of the 1-D grid to
  (row, first element), blocks of ``BLOCK`` elements, so 62 tensors of very different sizes cost
  one launch and no program runs empty. The kernel turns the addresses back into pointers with
  ``int -> pointer`` casts. The parameters stay the user's own tensors: nothing is copied or
  re-homed into a flat buffer.
- Every element is loaded (a gather by the mask would cost more than the bytes it saves with
  random masks: a 32-byte sector holds 8 floats) and every element is stored, pruned ones as 0.0,
  so pruned weights and their state are exactly zero after each step whatever they were before.
- Full blocks take an unmasked path and the addresses carry alignment hints when the host has
  checked them (``ALIGNED``), so the float loads and stores are 128-bit vectors; the last, partial
  block of each tensor takes a bounds-masked path. The mask pointer is hinted to 4 bytes only, so
  its bytes come 4 per thread like the floats and need no shuffle through shared memory (checked
  in the sm_90 PTX: with a 16-byte hint Triton loads 16 mask bytes per thread and converts the
  layout with 30 barriers per program).
- Hyperparameters are runtime float arguments, read from the param group at each step, so a
  learning-rate scheduler never causes a recompilation; only the structure (momentum on/off,
  Nesterov, alignment) is ``constexpr``.

The same kernel code runs under ``TRITON_INTERPRET=1``: there the kernel reads and writes host
memory at the addresses it computes, and the tensors behind the table are CPU tensors, so the
addresses are valid. (CUDA tensors under the interpreter would not be: the interpreter copies only
the tensors passed as arguments to the host. The launchers refuse that combination.)

The plain-torch reference of both steps (the CPU path and the tests' oracle) is in
``fastmask/optim.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_on

# Columns of a tensor-table row (constexpr globals, so the kernels can read them).
PARAM, GRAD, STATE_A, STATE_B, MASK, NUMEL = (tl.constexpr(column) for column in range(6))
ROW = tl.constexpr(6)


def block_size() -> int:
    """Elements per program: large on a GPU (16 per thread at 4 warps), small in the interpreter so
    that tiny test tensors still span full and partial blocks."""
    return 128 if interpreter_on() else 2048


# The block helpers below are written out in one function each, not split into small helpers:
# every nested jit call costs about a millisecond per program in the interpreter.

@triton.jit
def _sgd_block(row, offs, numel, lr, weight_decay, momentum, buf_decay, grad_scale,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
               FULL: tl.constexpr, BLOCK: tl.constexpr):
    # Full blocks load and store without bounds (so 128-bit vectors); the tail block with them.
    if FULL:
        bounds = None
        zero = None
    else:
        bounds = offs < numel
        zero = 0.0
    param = tl.load(row + PARAM).to(tl.pointer_type(tl.float32))
    grad = tl.load(row + GRAD).to(tl.pointer_type(tl.float32))
    buf = tl.load(row + STATE_A).to(tl.pointer_type(tl.float32))
    mask_address = tl.load(row + MASK)
    mask_ptr = mask_address.to(tl.pointer_type(tl.int8))
    if ALIGNED:
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        buf = tl.multiple_of(buf, 16)
        mask_ptr = tl.multiple_of(mask_ptr, 4)  # 4, not 16: see the module docstring
    # A zero mask address marks a dense tensor: nothing loaded, everything kept. The test is made
    # on a block, not on the scalar: the interpreter (triton 3.9) returns comparisons of loaded
    # scalars as integers, which tl.load rejects as a mask.
    has_mask = (tl.zeros([BLOCK], tl.int64) + mask_address) != 0
    if not FULL:
        has_mask = has_mask & bounds
    keep = tl.load(mask_ptr + offs, mask=has_mask, other=1) != 0

    # The operations and their order are torch.optim.SGD's (single-tensor path).
    p = tl.load(param + offs, mask=bounds, other=zero)
    d = tl.load(grad + offs, mask=bounds, other=zero) + weight_decay * p
    if HAS_MOMENTUM:
        # A fresh (zero) buffer with buf_decay = 0, grad_scale = 1 becomes d: torch's first step.
        b = tl.load(buf + offs, mask=bounds, other=zero) * buf_decay + grad_scale * d
        if NESTEROV:
            d = d + momentum * b
        else:
            d = b
        tl.store(buf + offs, tl.where(keep, b, 0.0), mask=bounds)
    tl.store(param + offs, tl.where(keep, p - lr * d, 0.0), mask=bounds)


@triton.jit(do_not_specialize=["block_base"])
def _masked_sgd_kernel(tensor_table, block_table, block_base, lr, weight_decay, momentum, buf_decay, grad_scale,
                       HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
                       BLOCK: tl.constexpr):
    block = block_base + tl.program_id(0)
    row = tensor_table + tl.load(block_table + 2 * block) * ROW
    start = tl.multiple_of(tl.load(block_table + 2 * block + 1), 16)
    numel = tl.load(row + NUMEL)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _sgd_block(row, offs, numel, lr, weight_decay, momentum, buf_decay, grad_scale,
                   HAS_MOMENTUM, NESTEROV, ALIGNED, True, BLOCK)
    else:
        _sgd_block(row, offs, numel, lr, weight_decay, momentum, buf_decay, grad_scale,
                   HAS_MOMENTUM, NESTEROV, ALIGNED, False, BLOCK)


@triton.jit
def _adamw_block(row, offs, numel, weight_scale, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                 neg_step_size, ALIGNED: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    if FULL:
        bounds = None
        zero = None
    else:
        bounds = offs < numel
        zero = 0.0
    param = tl.load(row + PARAM).to(tl.pointer_type(tl.float32))
    grad = tl.load(row + GRAD).to(tl.pointer_type(tl.float32))
    exp_avg = tl.load(row + STATE_A).to(tl.pointer_type(tl.float32))
    exp_avg_sq = tl.load(row + STATE_B).to(tl.pointer_type(tl.float32))
    mask_address = tl.load(row + MASK)
    mask_ptr = mask_address.to(tl.pointer_type(tl.int8))
    if ALIGNED:
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        exp_avg = tl.multiple_of(exp_avg, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        mask_ptr = tl.multiple_of(mask_ptr, 4)  # 4, not 16: see the module docstring
    has_mask = (tl.zeros([BLOCK], tl.int64) + mask_address) != 0  # see _sgd_block
    if not FULL:
        has_mask = has_mask & bounds
    keep = tl.load(mask_ptr + offs, mask=has_mask, other=1) != 0

    # The operations and their order are torch.optim.AdamW's (single-tensor path, CPU formulas);
    # division and square root are IEEE-rounded, as torch's, not the fast approximations.
    p = tl.load(param + offs, mask=bounds, other=zero) * weight_scale
    g = tl.load(grad + offs, mask=bounds, other=zero)
    m = tl.load(exp_avg + offs, mask=bounds, other=zero)
    # torch.lerp switches formula at weight 0.5 for accuracy near both ends (block test: see above).
    small_weight = (tl.zeros([BLOCK], tl.float32) + lerp_weight) < 0.5
    m = tl.where(small_weight, m + lerp_weight * (g - m), g - (g - m) * (1.0 - lerp_weight))
    v = tl.load(exp_avg_sq + offs, mask=bounds, other=zero) * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    tl.store(exp_avg + offs, tl.where(keep, m, 0.0), mask=bounds)
    tl.store(exp_avg_sq + offs, tl.where(keep, v, 0.0), mask=bounds)
    tl.store(param + offs, tl.where(keep, p, 0.0), mask=bounds)


@triton.jit(do_not_specialize=["block_base"])
def _masked_adamw_kernel(tensor_table, block_table, block_base, weight_scale, lerp_weight, beta2, one_minus_beta2,
                         bias_correction2_sqrt, eps, neg_step_size, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    block = block_base + tl.program_id(0)
    row = tensor_table + tl.load(block_table + 2 * block) * ROW
    start = tl.multiple_of(tl.load(block_table + 2 * block + 1), 16)
    numel = tl.load(row + NUMEL)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adamw_block(row, offs, numel, weight_scale, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt,
                     eps, neg_step_size, ALIGNED, True, BLOCK)
    else:
        _adamw_block(row, offs, numel, weight_scale, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt,
                     eps, neg_step_size, ALIGNED, False, BLOCK)


class TensorTable:
    """The device-side tables of one launch unit: tensors of one device, in a fixed order.

    ``rows`` lists, per tensor, (param, grad, state_a, state_b, mask) with ``None`` for an absent
    state or a dense tensor. All tensors must be float32 (the mask bool), dense in memory, and a
    row's tensors must share one memory layout (the kernel walks them as flat arrays). A run of
    consecutive rows is launched on its own through ``block_range``.
    """

    # Address tables kept on the device, by their contents: gradients set to None between steps are
    # reallocated, usually at the few addresses the caching allocator cycles through, so a step
    # finds its table here instead of copying a new one from the host.
    CACHED_TABLES = 4

    def __init__(self, rows: list[tuple], device: torch.device):
        if device.type == "cuda" and interpreter_on():
            raise RuntimeError("the fused optimizer kernels cannot run CUDA tensors under TRITON_INTERPRET=1: "
                               "the interpreter cannot follow device addresses; unset it or use FASTMASK_BACKEND=torch")
        _refuse_capture(device)
        self.block = block_size()
        self.rows = rows
        self.numels = [row[0].numel() for row in rows]
        counts = torch.tensor([-(-n // self.block) for n in self.numels], dtype=torch.int64)
        first = torch.cumsum(counts, 0) - counts
        self.row_first_block = first.tolist()
        self.num_blocks = int(counts.sum())
        row_of_block = torch.repeat_interleave(torch.arange(len(rows)), counts)
        start_of_block = (torch.arange(self.num_blocks) - first[row_of_block]) * self.block
        self.blocks = torch.stack([row_of_block, start_of_block], 1).contiguous().to(device)
        self.device = device
        self.table = None
        self.tables: dict[tuple, tuple[torch.Tensor, bool]] = {}  # addresses -> (device table, aligned)
        self.refresh()

    def refresh(self, grads: list[torch.Tensor] | None = None) -> None:
        """Point the table at the rows' tensors, with new gradient tensors where given (same order as
        rows): a table cached for these addresses, else a new one copied to the device."""
        if grads is not None:
            self.rows = [(row[0], g, *row[2:]) for row, g in zip(self.rows, grads)]
        addresses = tuple(tuple(0 if t is None else t.data_ptr() for t in row) + (n,)
                          for row, n in zip(self.rows, self.numels))
        cached = self.tables.pop(addresses, None)
        if cached is None:
            _refuse_capture(self.device)
            # A new tensor, never one rewritten: a kernel still queued may be reading an earlier table.
            cached = (torch.tensor(addresses, dtype=torch.int64).to(self.device, non_blocking=True),
                      all(address % 16 == 0 for row in addresses for address in row[:-1]))
            if len(self.tables) >= self.CACHED_TABLES:
                del self.tables[next(iter(self.tables))]  # the least recently used
        self.tables[addresses] = cached
        self.table, self.aligned = cached

    def block_range(self, first_row: int, end_row: int) -> tuple[int, int]:
        """(first block, number of blocks) covering rows [first_row, end_row)."""
        first = self.row_first_block[first_row]
        end = self.row_first_block[end_row] if end_row < len(self.rows) else self.num_blocks
        return first, end - first


def _refuse_capture(device: torch.device) -> None:
    """A table copied from the host inside a CUDA graph capture would be replayed from a host buffer
    long gone: tables are built and refreshed only by eager steps."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the fused optimizer's address table cannot be built inside a CUDA graph capture; "
                           "run its steps outside the graph (as fastmask.train.fit does)")


def masked_sgd_step(table: TensorTable, first_row: int, end_row: int, *, lr: float, weight_decay: float,
                    momentum: float, dampening: float, nesterov: bool, fresh: bool) -> None:
    """One masked SGD step, in place, over rows [first_row, end_row) of ``table``: one launch.

    ``fresh``: the rows' momentum buffers are new (zero) and take the gradient as is, as torch's
    first step does; otherwise buf = momentum * buf + (1 - dampening) * d.
    """
    block_base, num_blocks = table.block_range(first_row, end_row)
    if num_blocks == 0:
        return
    _masked_sgd_kernel[(num_blocks,)](
        table.table, table.blocks, block_base, float(lr), float(weight_decay), float(momentum),
        0.0 if fresh else float(momentum), 1.0 if fresh else 1.0 - float(dampening),
        HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), ALIGNED=table.aligned, BLOCK=table.block, num_warps=4,
    )


def masked_adamw_step(table: TensorTable, first_row: int, end_row: int, *, step: float, lr: float,
                      betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One masked AdamW step, in place, over rows [first_row, end_row), whose step count (after
    this step's increment) is ``step``: one launch. Scalars are formed as torch forms them."""
    block_base, num_blocks = table.block_range(first_row, end_row)
    if num_blocks == 0:
        return
    beta1, beta2 = float(betas[0]), float(betas[1])
    lr = float(lr)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    _masked_adamw_kernel[(num_blocks,)](
        table.table, table.blocks, block_base, 1 - lr * float(weight_decay), 1 - beta1, beta2, 1 - beta2,
        bias_correction2**0.5, float(eps), -(lr / bias_correction1),
        ALIGNED=table.aligned, BLOCK=table.block, num_warps=4,
    )
