"""Shared launch settings: autotune configurations and tl.dot precision."""
import torch
import triton

from fastmask.backend import interpreter_on


def matmul_configs(split_k: bool = False):
    """Autotune candidates for the GEMM-shaped kernels; one small tile in the interpreter (slow, exact)."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    shapes = [(128, 128, 32, 4, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
              (128, 128, 64, 3, 8), (64, 64, 64, 3, 4), (32, 64, 32, 4, 4), (32, 32, 32, 2, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """'tf32' for float32 when torch allows TF32 for this op, else exact 'ieee'."""
    return "tf32" if dtype == torch.float32 and allow_tf32 and not interpreter_on() else "ieee"


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot is wrong on bf16/fp16 operands (triton 3.9): upcast there."""
    return interpreter_on() and dtype in (torch.bfloat16, torch.float16)
