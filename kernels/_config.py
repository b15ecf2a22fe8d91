"""Shared launch settings: autotune configurations and tl.dot precision."""
import torch
import triton

from . import interpreter_on

# GPU autotune candidates of the GEMM-shaped kernels, (BLOCK_M, BLOCK_N, BLOCK_K, num_stages,
# num_warps), one list per way tl.dot runs. Every entry compiles for sm_90 (H100/H200) without a
# register spill and within the 227 KiB of shared memory a block may have, for every GEMM kernel;
# tests/test_cuda_compile.py checks that ahead of time (its table is in its slow test's output).
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


def _shape(config) -> tuple:
    kwargs = config.kwargs
    return kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], config.num_stages, config.num_warps


def matmul_configs():
    """Autotune candidates for the GEMM-shaped kernels: on a GPU both lists above, of which
    ``prune_matmul_configs`` keeps the one of each launch; one small tile in the interpreter (slow, exact)."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
            for m, n, k, s, w in TENSOR_CORE_SHAPES + FMA_SHAPES]


def prune_matmul_configs(configs, named_args, **kwargs):
    """The autotuner's early-prune hook: FMA_SHAPES for float32 operands at 'ieee' precision, else
    TENSOR_CORE_SHAPES. Every GEMM kernel takes its A operand first and PRECISION as a keyword."""
    if interpreter_on():
        return configs
    operand = next(iter(named_args.values()))
    fma = operand.dtype == torch.float32 and kwargs["PRECISION"] == "ieee"
    shapes = FMA_SHAPES if fma else TENSOR_CORE_SHAPES
    return [config for config in configs if _shape(config) in shapes]


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """'tf32' for float32 when torch allows TF32 for this op, else exact 'ieee'."""
    return "tf32" if dtype == torch.float32 and allow_tf32 and not interpreter_on() else "ieee"


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot is wrong on bf16/fp16 operands (triton 3.9): upcast there."""
    return interpreter_on() and dtype in (torch.bfloat16, torch.float16)
