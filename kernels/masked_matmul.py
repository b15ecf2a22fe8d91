"""Batched matmul with a fused weight mask: the kernel behind masked_linear (forward and backward).

C[b] = A[b] @ (B[b] * Bmask[b]) + bias[b], then C[b] *= Cmask[b]: every operand is addressed
through its strides, so transposes and broadcast batch dimensions (stride 0) cost nothing, and
the masked weight is formed in the tile loads, never in memory.

- forward:     y[k]  = x[k] @ (w[k] * m[k])^T + b[k]      (B = w^T through strides, Bmask = m^T)
- grad input:  gx[k] = gy[k] @ (w[k] * m[k])               (B = w, Bmask = m)
- grad weight: gw[k] = (gy[k]^T @ x[k]) * m[k]              (Cmask = m: the mask in the epilogue)
- interpolated forward (linear mode connectivity): y[k] = x[k] @ (w(alpha_k) * m)^T + b(alpha_k), with
  w(alpha) = (1 - alpha) * w_a + alpha * w_b (B2 = w_b^T) and b(alpha) likewise, formed in the tile
  loads and the epilogue from one copy of each: the K interpolated weights are never materialised.
"""
import torch
import triton
import triton.language as tl

from . import _alloc
from ._config import (dot_precision, launch_gemm, matmul_configs, prune_matmul_configs,
                                      size_bucket, upcast_operands)


# The autotune key: M and K as power-of-two buckets (one of them is the batch, which changes at a
# partial last batch: rows of the forward and grad-input, the reduction of grad-weight), N, the
# number of batched products (models or alphas), and which operands the call site has.
# M_BUCKET, K_BUCKET and BATCH are plain integers the kernel does not specialise on.
@triton.autotune(configs=matmul_configs(),
                 key=["M_BUCKET", "N", "K_BUCKET", "BATCH", "HAS_BMASK", "HAS_BIAS", "HAS_CMASK", "PRECISION",
                      "INTERPOLATE"],
                 prune_configs_by={"early_config_prune": prune_matmul_configs})
@triton.jit(do_not_specialize=["M_BUCKET", "K_BUCKET", "BATCH"])
def masked_bmm_kernel(
    a_ptr, b_ptr, bmask_ptr, bias_ptr, cmask_ptr, c_ptr, b2_ptr, bias2_ptr, alpha_ptr,
    M, N, K, M_BUCKET, K_BUCKET, BATCH,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_bmb, stride_bmk, stride_bmn,
    stride_biasb, stride_biasn,
    stride_cmb, stride_cmm, stride_cmn,
    stride_cb, stride_cm, stride_cn,
    HAS_BMASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CMASK: tl.constexpr, INTERPOLATE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # With INTERPOLATE, batch k's B is (1 - alpha_k) * B + alpha_k * B2 and its bias likewise; B2 / bias2
    # share B's / bias's strides.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    a_rows = a_ptr + batch * stride_ab + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + batch * stride_bb + offs_n[None, :].to(tl.int64) * stride_bn
    bm_cols = bmask_ptr + batch * stride_bmb + offs_n[None, :].to(tl.int64) * stride_bmn
    if INTERPOLATE:
        alpha = tl.load(alpha_ptr + batch).to(tl.float32)
        b2_cols = b2_ptr + batch * stride_bb + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b_ok = in_k[:, None] & in_n[None, :]
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=b_ok, other=0.0)
        if INTERPOLATE:
            b2 = tl.load(b2_cols + offs_k[:, None] * stride_bk, mask=b_ok, other=0.0)
            b = ((1.0 - alpha) * b.to(tl.float32) + alpha * b2.to(tl.float32)).to(b_ptr.dtype.element_ty)
        if HAS_BMASK:
            keep = tl.load(bm_cols + offs_k[:, None] * stride_bmk, mask=b_ok, other=0)
            b = tl.where(keep != 0, b, tl.zeros_like(b))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * stride_biasb + offs_n * stride_biasn, mask=in_n, other=0.0).to(tl.float32)
        if INTERPOLATE:
            bias2 = tl.load(bias2_ptr + batch * stride_biasb + offs_n * stride_biasn, mask=in_n, other=0.0)
            bias = (1.0 - alpha) * bias + alpha * bias2.to(tl.float32)
        acc += bias[None, :]
    c_ok = in_m[:, None] & in_n[None, :]
    if HAS_CMASK:
        keep = tl.load(cmask_ptr + batch * stride_cmb + offs_m[:, None] * stride_cmm + offs_n[None, :] * stride_cmn,
                       mask=c_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    c = c_ptr + batch * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def _batch_strides(t: torch.Tensor, batch: int):
    """Strides of a [batch or 1, rows, cols] operand; a batch of 1 broadcasts (stride 0)."""
    return (0 if t.shape[0] == 1 and batch > 1 else t.stride(0)), t.stride(1), t.stride(2)


def masked_bmm(a, b, b_mask=None, bias=None, c_mask=None, *, allow_tf32=False, b2=None, bias2=None, alphas=None):
    """C = A @ (B * b_mask) + bias, then C * c_mask, for 3-d operands [batch or 1, ., .].

    Returns C [batch, M, N] in A's dtype. Masks are boolean and broadcast like their operands.
    With ``alphas`` [batch] (float32), batch k uses ``(1 - alphas[k]) * B + alphas[k] * b2`` for B and
    ``(1 - alphas[k]) * bias + alphas[k] * bias2`` for the bias (b2 / bias2 with B's / bias's strides).
    """
    batch = max(a.shape[0], b.shape[0], 1 if alphas is None else alphas.shape[0])
    M, K = a.shape[1:]
    N = b.shape[2]
    c = _alloc.empty((batch, M, N), device=a.device, dtype=a.dtype)
    dummy = c
    bm = b_mask if b_mask is not None else dummy
    bias_t = bias if bias is not None else dummy
    cm = c_mask if c_mask is not None else dummy
    bm_strides = _batch_strides(b_mask, batch) if b_mask is not None else (0, 0, 0)
    cm_strides = _batch_strides(c_mask, batch) if c_mask is not None else (0, 0, 0)
    bias_strides = ((0 if bias.shape[0] == 1 else bias.stride(0)), bias.stride(1)) if bias is not None else (0, 0)
    interpolate = alphas is not None

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), batch

    launch_gemm(
        masked_bmm_kernel, grid,
        a, b, bm, bias_t, cm, c, b2 if interpolate else b, bias2 if interpolate and bias is not None else bias_t,
        alphas if interpolate else dummy, M, N, K, size_bucket(M), size_bucket(K), batch,
        *_batch_strides(a, batch), *_batch_strides(b, batch), *bm_strides, *bias_strides, *cm_strides,
        *c.stride(),
        HAS_BMASK=b_mask is not None, HAS_BIAS=bias is not None, HAS_CMASK=c_mask is not None,
        INTERPOLATE=interpolate, UPCAST=upcast_operands(a.dtype), PRECISION=dot_precision(a.dtype, allow_tf32),
    )
    return c


def linear_forward(x, w, m, bias, allow_tf32):
    """y [K, M, out] from x [K or 1, M, in], w and m [K or 1, out, in], bias [K or 1, out] or None."""
    return masked_bmm(x, w.transpose(1, 2), m.transpose(1, 2), bias, allow_tf32=allow_tf32)


def interpolated_linear_forward(x, w_a, w_b, m, bias_a, bias_b, alphas, allow_tf32):
    """y [K, M, out] for the K = len(alphas) interpolations of w_a / w_b [1, out, in] (one layout) and
    of the biases [1, out] (one layout, or None) from x [K or 1, M, in]; m [1, out, in]."""
    return masked_bmm(x, w_a.transpose(1, 2), m.transpose(1, 2), bias_a, allow_tf32=allow_tf32,
                      b2=w_b.transpose(1, 2), bias2=bias_b, alphas=alphas)


def linear_grad_input(grad_y, w, m, allow_tf32):
    """gx [K, M, in] = gy [K, M, out] @ (w * m)."""
    return masked_bmm(grad_y, w, m, allow_tf32=allow_tf32)


def linear_grad_weight(grad_y, x, m, allow_tf32):
    """gw [K, out, in] = (gy^T @ x) * m, the mask applied in the epilogue."""
    return masked_bmm(grad_y.transpose(1, 2), x, c_mask=m, allow_tf32=allow_tf32)
