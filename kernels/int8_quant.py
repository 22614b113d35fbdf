"""Triton kernels for per-token int8 quantization: ``quantize_per_token`` and ``layernorm_quant``.

Both read each row once: a program loads BLOCK_M whole rows into registers, reduces the absmax
(after the LayerNorm, for layernorm_quant), and writes the int8 row and its float32 scale.
Rows longer than ONE_PASS_MAX take a two-pass path in quantize_per_token (the second read
comes from L2); layernorm_quant keeps the row in registers always (the dispatcher sends longer
rows elsewhere).

Rounding matches the definition (xray_ops.reference.int8): x / scale is an IEEE division
(tl.math.div_rn: correctly rounded, unlike the GPU's default approximate division), then round
half to even by adding and subtracting 1.5·2**23, which is exact for |v| <= 127 and gives the
same bits on the GPU and under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows up to this many elements stay in registers (one read of x)
ONE_PASS_MAX = 16384
_TWO_PASS_BLOCK = 4096


@triton.jit
def _round_half_even(v):
    # |v| <= 127: v + 1.5·2**23 lands in [2**23, 2**24), where the float32 spacing is 1, so the
    # addition rounds v to an integer, ties to even; the subtraction is exact.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _row_scale(absmax, nan_sum):
    """absmax (BLOCK_M,) -> float32 scale: absmax / 127 (IEEE), 1 for 0, NaN for NaN rows."""
    scale = tl.math.div_rn(absmax, 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    # nan_sum is 0 for rows without NaN and NaN otherwise: adding it keeps the others exact
    return scale + nan_sum


@triton.jit
def _quantize(v, scale):
    """v (BLOCK_M, BLOCK_K) float32, scale (BLOCK_M, 1) -> int8, the definition's rounding."""
    r = tl.math.div_rn(v, scale)
    r = tl.where(r != r, 0.0, r)  # NaN (a NaN row, or Inf / Inf) -> 0
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    return _round_half_even(r).to(tl.int8)


@triton.jit
def _quantize_per_token_kernel(
    X_ptr,  # input, shape (M, K), any strides
    Q_ptr,  # int8 output, shape (M, K), contiguous
    S_ptr,  # float32 scales, shape (M,), contiguous
    M,
    K,
    stride_xm,
    stride_xk,
    ONE_PASS: tl.constexpr,  # the whole row fits in BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    x_rows = X_ptr + rows[:, None] * stride_xm
    q_rows = Q_ptr + rows[:, None] * K
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.where(x == x, tl.abs(x), 0.0), axis=1)
        nan_sum = tl.sum(tl.where(x != x, x, 0.0), axis=1)
        scale = _row_scale(absmax, nan_sum)
        tl.store(q_rows + cols[None, :], _quantize(x, scale[:, None]), mask=mask)
    else:
        absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        nan_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.where(x == x, tl.abs(x), 0.0), axis=1))
            nan_sum += tl.sum(tl.where(x != x, x, 0.0), axis=1)
        scale = _row_scale(absmax, nan_sum)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + cols[None, :], _quantize(x, scale[:, None]), mask=mask)
    tl.store(S_ptr + rows, scale, mask=mask_m)


@triton.jit
def _layernorm_quant_kernel(
    X_ptr,  # input, shape (M, C), any strides
    W_ptr,  # LayerNorm weight, shape (C,) (unused without HAS_W)
    B_ptr,  # LayerNorm bias, shape (C,) (unused without HAS_B)
    Q_ptr,  # int8 output, shape (M, C), contiguous
    S_ptr,  # float32 scales, shape (M,), contiguous
    M,
    C,
    eps,
    stride_xm,
    stride_xc,
    stride_w,
    stride_b,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_m = rows < M
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    x = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask,
                other=0.0).to(tl.float32)
    # statistics in float32; the centred second moment, not E[x²] - mean², for accuracy
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W_ptr + cols * stride_w, mask=mask_c, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B_ptr + cols * stride_b, mask=mask_c, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y = tl.where(mask, y, 0.0)
    absmax = tl.max(tl.where(y == y, tl.abs(y), 0.0), axis=1)
    nan_sum = tl.sum(tl.where(y != y, y, 0.0), axis=1)
    scale = _row_scale(absmax, nan_sum)
    tl.store(Q_ptr + rows[:, None] * C + cols[None, :], _quantize(y, scale[:, None]), mask=mask)
    tl.store(S_ptr + rows, scale, mask=mask_m)


def _rows_per_program(block: int) -> int:
    # about 8K elements per program: enough work per launch, bounded registers
    return max(1, min(32, 8192 // block))


def quantize_per_token(x: torch.Tensor):
    """x (M, K) float16/bfloat16/float32 -> (x_q (M, K) int8, scale (M, 1) float32)."""
    M, K = x.shape
    q = torch.empty(M, K, device=x.device, dtype=torch.int8)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M == 0:
        return q, s
    one_pass = triton.next_power_of_2(K) <= ONE_PASS_MAX
    BLOCK_K = triton.next_power_of_2(K) if one_pass else _TWO_PASS_BLOCK
    BLOCK_M = _rows_per_program(BLOCK_K)
    grid = (triton.cdiv(M, BLOCK_M),)
    _quantize_per_token_kernel[grid](
        x, q, s, M, K, x.stride(0), x.stride(1),
        ONE_PASS=one_pass, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
        num_warps=4 if BLOCK_K <= 2048 else 8,
    )
    return q, s


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float):
    """x (M, C) -> (x_q (M, C) int8, scale (M, 1) float32) of LayerNorm(x); C <= ONE_PASS_MAX."""
    M, C = x.shape
    q = torch.empty(M, C, device=x.device, dtype=torch.int8)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M == 0:
        return q, s
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_M = _rows_per_program(BLOCK_C)
    grid = (triton.cdiv(M, BLOCK_M),)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    _layernorm_quant_kernel[grid](
        x, w, b, q, s, M, C, eps, x.stride(0), x.stride(1),
        w.stride(0) if weight is not None else 0, b.stride(0) if bias is not None else 0,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
        num_warps=4 if BLOCK_C <= 2048 else 8,
    )
    return q, s
