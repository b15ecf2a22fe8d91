"""Shared launch settings: autotune configurations, how a GEMM kernel is launched, tl.dot precision."""
import os

import torch
import triton

from . import interpreter_on

# GPU autotune candidates of the GEMM-shaped kernels, (BLOCK_M, BLOCK_N, BLOCK_K, num_stages,
# num_warps), one list per way tl.dot runs. Every entry compiles for sm_90 (H100/H200) without a
# register spill and within the 227 KiB of shared memory a block may have, for every GEMM kernel;
# tests/test_cuda_compile.py checks that ahead of time (`python tests/test_cuda_compile.py` prints its table).
#
# Tensor cores (bf16, fp16, and float32 as tf32). Measured against the earlier single list
# (triton 3.9, ptxas 13.4): 128x128x64 in 3 stages needed 256-272 KiB of shared memory in float32
# and spilled in the bf16 conv forward (36 B) and conv grad-weight (92 B); 128x64, 64x128 and
# 64x64x64 tiles on 4 warps spilled 16-260 B in the conv grads, and 128x128x32 in 4 stages 16 B
# in the tf32 grad-weight: 8 warps (half the tile per thread) or one stage fewer remove them.
# 32x32x32 on 2 warps spilled 4-8 B at tf32: 4 warps.
TENSOR_CORE_SHAPES = [(128, 128, 32, 3, 8), (128, 64, 32, 4, 8), (64, 128, 32, 3, 8), (64, 64, 32, 4, 8),
                      (64, 64, 64, 3, 8), (32, 64, 32, 4, 4), (32, 32, 32, 2, 4)]
# float32 with exact ("ieee") precision runs on FMA units, and there register use grows with BLOCK_K:
# at BLOCK_K = 32 every tile but 32x32 spilled (0.1-27 KB per thread), at 16 the 128-wide tiles and
# 64x64 on 4 warps still did (4-7500 B, triton 3.6 or 3.9). Triton 3.6 refuses tl.dot with K < 16.
FMA_SHAPES = [(64, 64, 16, 4, 8), (32, 64, 16, 3, 4), (32, 32, 16, 3, 2)]

# FASTMASK_AUTOTUNE=one: the single config of each kind, launched without timing anything. A fresh
# GPU then compiles one variant per kernel specialisation instead of one per candidate (triton 3.6
# also times a lone candidate that survives the prune, ~0.1 s per new key). Chosen, unmeasured, as
# middle-sized tiles of each list: 128 output pixels by 64 channels fills the tensor cores for the
# 64-512-channel layers of ConvNet-3 and ResNet-18, and 64x64x16 is the largest FMA tile that does
# not spill. FASTMASK_AUTOTUNE=full (the default) tunes over the lists above, once per key.
AUTOTUNE_MODES = ("full", "one")
ONE_TENSOR_CORE_SHAPE = (128, 64, 32, 4, 8)
ONE_FMA_SHAPE = (64, 64, 16, 4, 8)


def _shape(config) -> tuple:
    kwargs = config.kwargs
    return kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], config.num_stages, config.num_warps


def _config(shape) -> triton.Config:
    m, n, k, stages, warps = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=stages, num_warps=warps)


def matmul_configs():
    """Autotune candidates for the GEMM-shaped kernels: on a GPU both lists above, of which
    ``prune_matmul_configs`` keeps the one of each launch; one small tile in the interpreter (slow, exact)."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [_config(shape) for shape in TENSOR_CORE_SHAPES + FMA_SHAPES]


def _uses_fma(dtype: torch.dtype, precision: str) -> bool:
    """Whether tl.dot runs on FMA units (float32 at 'ieee' precision) rather than tensor cores."""
    return dtype == torch.float32 and precision == "ieee"


def prune_matmul_configs(configs, named_args, **kwargs):
    """The autotuner's early-prune hook: FMA_SHAPES for float32 operands at 'ieee' precision, else
    TENSOR_CORE_SHAPES. Every GEMM kernel takes its A operand first and PRECISION as a keyword."""
    if interpreter_on():
        return configs
    operand = next(iter(named_args.values()))
    shapes = FMA_SHAPES if _uses_fma(operand.dtype, kwargs["PRECISION"]) else TENSOR_CORE_SHAPES
    return [config for config in configs if _shape(config) in shapes]


def autotune_mode() -> str:
    """``FASTMASK_AUTOTUNE`` (``full`` when unset), read at every launch like ``FASTMASK_BACKEND``."""
    mode = os.environ.get("FASTMASK_AUTOTUNE", "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"FASTMASK_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


def one_config(dtype: torch.dtype, precision: str) -> triton.Config:
    """The config ``FASTMASK_AUTOTUNE=one`` launches for operands of ``dtype`` at ``precision``."""
    if interpreter_on():
        return matmul_configs()[0]
    return _config(ONE_FMA_SHAPE if _uses_fma(dtype, precision) else ONE_TENSOR_CORE_SHAPE)


def launch_gemm(kernel, grid, *args, **kwargs):
    """Launch one of the autotuned GEMM kernels: through its autotuner (``FASTMASK_AUTOTUNE=full``)
    or, with ``one``, its JIT function at ``one_config`` (nothing timed, one variant compiled)."""
    if autotune_mode() == "full":
        return kernel[grid](*args, **kwargs)
    return kernel.fn[grid](*args, **kwargs, **one_config(args[0].dtype, kwargs["PRECISION"]).all_kwargs())


def size_bucket(size: int) -> int:
    """A size that changes from call to call (the batch) as the autotune key holds it: the next power
    of two, so that a partial last batch reuses its bucket's tuning instead of timing every config again."""
    return triton.next_power_of_2(max(int(size), 1))


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """'tf32' for float32 when torch allows TF32 for this op, else exact 'ieee'."""
    return "tf32" if dtype == torch.float32 and allow_tf32 and not interpreter_on() else "ieee"


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot is wrong on bf16/fp16 operands (triton 3.9): upcast there."""
    return interpreter_on() and dtype in (torch.bfloat16, torch.float16)
