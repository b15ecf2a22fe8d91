"""Implicit-GEMM masked conv2d for a stack of K models: forward, grad-input, grad-weight.

Every tensor is addressed through its strides, so NCHW and channels_last inputs, and an input
shared by all K models (batch stride 0), need no copies. The mask is applied to the weight in
the tile loads (forward, grad-input) and to grad-weight in the epilogue: no ``weight * mask``
tensor is ever materialised. Padding is (top, left); bottom/right padding only shapes the
output size, which the launcher receives. Reductions run over (r, s, c) so consecutive lanes
read consecutive channels of channels_last tensors.

Shapes: x [K, N, C, H, W], w/m [K, O, C, R, S] (m may have K=1), y [K, N, O, OH, OW].

The forward kernel also evaluates K linear interpolations of two weight sets (linear mode
connectivity): with ``INTERPOLATE``, model k's weight is ``(1 - alphas[k]) * w + alphas[k] * w_b``
and its bias ``(1 - alphas[k]) * bias + alphas[k] * bias_b``, formed in the tile loads from one
copy of each (w, w_b [1, O, C, R, S]), so the K interpolated weight sets never exist in memory.
"""
import torch
import triton
import triton.language as tl

from . import _alloc
from ._config import (dot_precision, launch_gemm, matmul_configs, prune_matmul_configs,
                                      size_bucket, upcast_operands)

# The autotune key of every conv kernel: the layer (channels, image and filter sizes, stride,
# padding, dilation), the batch as its power-of-two bucket (N_BUCKET: a partial last batch does not
# re-tune), the number of models K (LMC's one-alpha memory probe must not choose the tiles of its
# 30 alphas) and the memory layouts (NCHW or channels_last: the strides of channels and columns,
# which do not depend on the batch). K_MODELS and N_BUCKET are plain integers that the kernels do
# not specialise on (one compiled variant whatever their values).
_LAYER_KEY = ["N_BUCKET", "C", "H", "W", "O", "R", "S", "K_MODELS", "stride_h", "stride_w", "pad_h", "pad_w",
              "dil_h", "dil_w"]


@triton.autotune(configs=matmul_configs(),
                 key=_LAYER_KEY + ["sxc", "sxw", "swc", "sws", "PRECISION", "INTERPOLATE"],
                 prune_configs_by={"early_config_prune": prune_matmul_configs})
@triton.jit(do_not_specialize=["K_MODELS", "N_BUCKET"])
def conv_forward_kernel(
    x_ptr, w_ptr, m_ptr, bias_ptr, y_ptr, w_b_ptr, bias_b_ptr, alpha_ptr,
    N, C, H, W, O, OH, OW, R, S, K_MODELS, N_BUCKET,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxk, sxn, sxc, sxh, sxw,
    swk, swo, swc, swr, sws,
    smk, smo, smc, smr, sms,
    sbk, sbo,
    syk, syn, syo, syh, syw,
    HAS_BIAS: tl.constexpr, INTERPOLATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # With INTERPOLATE, w_b / bias_b share w's / bias's strides and alpha_ptr holds the K alphas.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels
    in_m = offs_m < N * OH * OW
    in_o = offs_o < O
    n = (offs_m // (OH * OW)).to(tl.int64)
    oh = (offs_m // OW) % OH
    ow = offs_m % OW
    x_base = x_ptr + k * sxk + n[:, None] * sxn
    w_base = w_ptr + k * swk + offs_o[None, :] * swo
    m_base = m_ptr + k * smk + offs_o[None, :] * smo
    if INTERPOLATE:
        alpha = tl.load(alpha_ptr + k).to(tl.float32)
        w_b_base = w_b_ptr + k * swk + offs_o[None, :] * swo
    CRS = C * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CRS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < CRS
        c = offs_k % C
        r = offs_k // (C * S)
        s = (offs_k // C) % S
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        x_ok = in_m[:, None] & in_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_base + c[None, :] * sxc + ih * sxh + iw * sxw, mask=x_ok, other=0.0)
        w_ok = in_k[:, None] & in_o[None, :]
        w_off = c[:, None] * swc + r[:, None] * swr + s[:, None] * sws
        wt = tl.load(w_base + w_off, mask=w_ok, other=0.0)
        if INTERPOLATE:
            wt_b = tl.load(w_b_base + w_off, mask=w_ok, other=0.0)
            wt = ((1.0 - alpha) * wt.to(tl.float32) + alpha * wt_b.to(tl.float32)).to(w_ptr.dtype.element_ty)
        keep = tl.load(m_base + c[:, None] * smc + r[:, None] * smr + s[:, None] * sms, mask=w_ok, other=0)
        wt = tl.where(keep != 0, wt, tl.zeros_like(wt))
        if UPCAST:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * sbk + offs_o * sbo, mask=in_o, other=0.0).to(tl.float32)
        if INTERPOLATE:
            bias_b = tl.load(bias_b_ptr + k * sbk + offs_o * sbo, mask=in_o, other=0.0).to(tl.float32)
            bias = (1.0 - alpha) * bias + alpha * bias_b
        acc += bias[None, :]
    y = y_ptr + k * syk + n[:, None] * syn + offs_o[None, :] * syo + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_o[None, :])


@triton.autotune(configs=matmul_configs(), key=_LAYER_KEY + ["sgo", "sgw", "swc", "sws", "sxc", "sxw", "PRECISION"],
                 prune_configs_by={"early_config_prune": prune_matmul_configs})
@triton.jit(do_not_specialize=["K_MODELS", "N_BUCKET"])
def conv_grad_input_kernel(
    gy_ptr, w_ptr, m_ptr, gx_ptr,
    N, C, H, W, O, OH, OW, R, S, K_MODELS, N_BUCKET,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgk, sgn, sgo, sgh, sgw,
    swk, swo, swc, swr, sws,
    smk, smo, smc, smr, sms,
    sxk, sxn, sxc, sxh, sxw,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # gx[n, c, ih, iw] = sum over (r, s, o) of gy[n, o, oh, ow] * (w*m)[o, c, r, s]
    # where ih = oh * stride - pad + r * dil: the output pixels that read input pixel ih.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels (n, ih, iw)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    in_m = offs_m < N * H * W
    in_c = offs_c < C
    n = (offs_m // (H * W)).to(tl.int64)
    ih = (offs_m // W) % H
    iw = offs_m % W
    gy_base = gy_ptr + k * sgk + n[:, None] * sgn
    w_base = w_ptr + k * swk + offs_c[None, :] * swc
    m_base = m_ptr + k * smk + offs_c[None, :] * smc
    ORS = O * R * S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ORS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < ORS
        o = offs_k % O
        r = offs_k // (O * S)
        s = (offs_k // O) % S
        th = ih[:, None] + pad_h - r[None, :] * dil_h
        tw = iw[:, None] + pad_w - s[None, :] * dil_w
        th_ok = th >= 0
        tw_ok = tw >= 0
        th = tl.where(th_ok, th, 0)
        tw = tl.where(tw_ok, tw, 0)
        oh = th // stride_h
        ow = tw // stride_w
        g_ok = (in_m[:, None] & in_k[None, :] & th_ok & tw_ok & (th % stride_h == 0) & (tw % stride_w == 0)
                & (oh < OH) & (ow < OW))
        g = tl.load(gy_base + o[None, :] * sgo + oh * sgh + ow * sgw, mask=g_ok, other=0.0)
        w_ok = in_k[:, None] & in_c[None, :]
        wt = tl.load(w_base + o[:, None] * swo + r[:, None] * swr + s[:, None] * sws, mask=w_ok, other=0.0)
        keep = tl.load(m_base + o[:, None] * smo + r[:, None] * smr + s[:, None] * sms, mask=w_ok, other=0)
        wt = tl.where(keep != 0, wt, tl.zeros_like(wt))
        if UPCAST:
            g = g.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(g, wt, acc, input_precision=PRECISION)
    gx = gx_ptr + k * sxk + n[:, None] * sxn + offs_c[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=in_m[:, None] & in_c[None, :])


# SPLIT and SPLIT_LEN follow the batch: not specialised on either (SPLIT_LEN takes a new value at
# almost every batch size, and would otherwise compile a variant per divisibility class).
@triton.autotune(configs=matmul_configs(), key=_LAYER_KEY + ["SPLIT", "sgo", "sgw", "sxc", "sxw", "PRECISION"],
                 prune_configs_by={"early_config_prune": prune_matmul_configs})
@triton.jit(do_not_specialize=["K_MODELS", "N_BUCKET", "SPLIT", "SPLIT_LEN"])
def conv_grad_weight_kernel(
    gy_ptr, x_ptr, m_ptr, gw_ptr,
    N, C, H, W, O, OH, OW, R, S, K_MODELS, N_BUCKET, SPLIT, SPLIT_LEN,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgk, sgn, sgo, sgh, sgw,
    sxk, sxn, sxc, sxh, sxw,
    smk, smo, smc, smr, sms,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # gw[o, (r, s, c)] = m * sum over output pixels p of gy[p, o] * x[p shifted by (r, s), c].
    # Split-K: program (k, split) sums pixels [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) into its
    # own fp32 slice of gw_ptr [SPLIT, K, O, R, S, C]; the launcher adds the slices.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = (tl.program_id(2) // SPLIT).to(tl.int64)
    split = tl.program_id(2) % SPLIT
    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_q = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (r, s, c) flattened
    in_o = offs_o < O
    CRS = C * R * S
    in_q = offs_q < CRS
    c = offs_q % C
    r = offs_q // (C * S)
    s = (offs_q // C) % S
    P = N * OH * OW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_start = split * SPLIT_LEN
    for p0 in range(0, SPLIT_LEN, BLOCK_K):
        offs_p = p_start + p0 + tl.arange(0, BLOCK_K)
        in_p = (offs_p < P) & (p0 + tl.arange(0, BLOCK_K) < SPLIT_LEN)
        n = (offs_p // (OH * OW)).to(tl.int64)
        oh = (offs_p // OW) % OH
        ow = offs_p % OW
        g = tl.load(gy_ptr + k * sgk + n[None, :] * sgn + offs_o[:, None] * sgo + oh[None, :] * sgh
                    + ow[None, :] * sgw, mask=in_o[:, None] & in_p[None, :], other=0.0)
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        x_ok = in_p[:, None] & in_q[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_ptr + k * sxk + n[:, None] * sxn + c[None, :] * sxc + ih * sxh + iw * sxw, mask=x_ok, other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=PRECISION)
    ok = in_o[:, None] & in_q[None, :]
    keep = tl.load(m_ptr + k * smk + offs_o[:, None] * smo + c[None, :] * smc
                   + r[None, :] * smr + s[None, :] * sms, mask=ok, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    slice_base = (split.to(tl.int64) * K_MODELS + k) * O * CRS
    tl.store(gw_ptr + slice_base + offs_o[:, None] * CRS + offs_q[None, :], acc, mask=ok)


def _strides5(t: torch.Tensor, models: int):
    """Strides of a [K or 1, ...] 5-d tensor; a leading 1 broadcasts over the K models."""
    return (0 if t.shape[0] == 1 and models > 1 else t.stride(0),) + tuple(t.stride()[1:])


def output_size(size, kernel, stride, pad_lo, pad_hi, dilation):
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def conv_forward(x, w, m, bias, stride, padding, dilation, allow_tf32, w_b=None, bias_b=None, alphas=None):
    """y [K, N, O, OH, OW] in x's memory format. padding = (top, bottom, left, right).

    With ``alphas`` [K] (float32): the K interpolations of ``w``/``w_b`` (both [1, O, C, R, S], one
    layout) and of ``bias``/``bias_b`` (both [1, O], one layout, or None), as the module docstring says.
    """
    O, C, R, S = w.shape[1:]
    K = w.shape[0] if alphas is None else alphas.shape[0]
    N, _, H, W = x.shape[1:]
    OH = output_size(H, R, stride[0], padding[0], padding[1], dilation[0])
    OW = output_size(W, S, stride[1], padding[2], padding[3], dilation[1])
    y = stacked_empty((K, N, O, OH, OW), x)
    bias_t = bias if bias is not None else y
    bias_strides = (0 if bias.shape[0] == 1 else bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    interpolate = alphas is not None

    def grid(meta):
        return triton.cdiv(N * OH * OW, meta["BLOCK_M"]), triton.cdiv(O, meta["BLOCK_N"]), K

    launch_gemm(
        conv_forward_kernel, grid,
        x, w, m, bias_t, y, w_b if interpolate else w, bias_b if interpolate and bias is not None else bias_t,
        alphas if interpolate else y, N, C, H, W, O, OH, OW, R, S, K, size_bucket(N),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *_strides5(x, K), *_strides5(w, K), *_strides5(m, K), *bias_strides, *y.stride(),
        HAS_BIAS=bias is not None, INTERPOLATE=interpolate, UPCAST=upcast_operands(x.dtype),
        PRECISION=dot_precision(x.dtype, allow_tf32),
    )
    return y


def conv_grad_input(grad_y, w, m, x, stride, padding, dilation, allow_tf32):
    """gx [K, N, C, H, W] laid out like x (one slice per model; the caller sums them for a shared x)."""
    K, O, C, R, S = w.shape
    N, _, H, W = x.shape[1:]
    OH, OW = grad_y.shape[-2:]
    gx = stacked_empty((K, N, C, H, W), x)

    def grid(meta):
        return triton.cdiv(N * H * W, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_N"]), K

    launch_gemm(
        conv_grad_input_kernel, grid,
        grad_y, w, m, gx, N, C, H, W, O, OH, OW, R, S, K, size_bucket(N),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *grad_y.stride(), *w.stride(), *_strides5(m, K), *gx.stride(),
        UPCAST=upcast_operands(grad_y.dtype), PRECISION=dot_precision(grad_y.dtype, allow_tf32),
    )
    return gx


def conv_grad_weight(grad_y, x, w, m, stride, padding, dilation, allow_tf32):
    """gw [K, O, C, R, S] laid out like w: mask * (grad_y correlated with x)."""
    K, O, C, R, S = w.shape
    N, _, H, W = x.shape[1:]
    OH, OW = grad_y.shape[-2:]
    pixels = N * OH * OW
    n_bucket = size_bucket(N)
    split = grad_weight_splits(K, O, C * R * S, n_bucket * OH * OW, x.device)
    split_len = triton.cdiv(pixels, split)
    partial = _alloc.empty((split, K, O, R, S, C), device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(O, meta["BLOCK_M"]), triton.cdiv(C * R * S, meta["BLOCK_N"]), K * split

    launch_gemm(
        conv_grad_weight_kernel, grid,
        grad_y, x, m, partial, N, C, H, W, O, OH, OW, R, S, K, n_bucket, split, split_len,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        *grad_y.stride(), *_strides5(x, K), *_strides5(m, K),
        UPCAST=upcast_operands(x.dtype), PRECISION=dot_precision(x.dtype, allow_tf32),
    )
    # The slices are laid out (r, s, c) per filter: w's own order when w is channels_last, so a
    # float32 weight's gradient is then the (summed) slices themselves, not a copy of them.
    gw = (partial[0] if split == 1 else partial.sum(0)).permute(0, 1, 4, 2, 3)
    if gw.dtype == w.dtype and gw.stride() == torch.empty_like(w, device="meta").stride():
        return gw
    return _alloc.empty_like(w).copy_(gw)


def grad_weight_splits(models: int, out_channels: int, reduction: int, pixels: int, device: torch.device) -> int:
    """Slices of the pixel reduction of grad-weight (split-K), so that a small weight grid (few
    64 x 64 tiles of [O, C*R*S]) still fills the GPU's 132 multiprocessors twice over: at most 64,
    at least 1024 pixels each. One slice in the interpreter, which has no parallelism to gain.
    ``pixels`` is the bucketed batch's, so that every batch of a bucket splits alike (one autotune key)."""
    if device.type == "cpu":
        return 1
    tiles = triton.cdiv(out_channels, 64) * triton.cdiv(reduction, 64) * models
    return max(1, min(64, 264 // max(tiles, 1), pixels // 1024))


def _images_format(like: torch.Tensor) -> torch.memory_format:
    images = like[0]
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
        and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def stacked_empty(shape, like: torch.Tensor) -> torch.Tensor:
    """A [K, N, C, H, W] output whose per-model images share ``like``'s memory format
    (channels_last or contiguous); the fake (meta) kernels allocate with it too."""
    K, N = shape[:2]
    out = _alloc.empty((K * N, *shape[2:]), device=like.device, dtype=like.dtype, memory_format=_images_format(like))
    return out.view(shape)


def stacked_strides(shape, like: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``stacked_empty(shape, like)``, without allocating it."""
    K, N = shape[:2]
    return torch.empty((K * N, *shape[2:]), device="meta", memory_format=_images_format(like)).view(shape).stride()
