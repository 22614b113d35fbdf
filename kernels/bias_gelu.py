"""Triton kernels for ``bias_gelu``: y = gelu(x + bias), and its backward.

Forward: one program per (BLOCK_M, BLOCK_C) tile, float32 math, one cast to the output dtype.
Backward: dx = dy · gelu'(x + bias) recomputed from x; d bias is a column sum over all rows: a
grid of (row programs, column blocks) where each row program walks every n_row_progs-th row
block and keeps its partial column sum in registers, written to a (n_row_progs, C) float32
buffer that the launcher sums (a fixed order: deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gelu import gelu, gelu_grad
from ._launch import sm_count

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(C: int):
    if INTERPRETING:  # few programs: the interpreter runs them one by one
        return 8, min(1024, triton.next_power_of_2(C))
    block_c = min(1024, triton.next_power_of_2(C))
    return max(1, 4096 // block_c), block_c


@triton.jit
def _bias_gelu_fwd_kernel(
    X_ptr,  # input, shape (M, C), any strides
    BIAS_ptr,  # bias, shape (C,) (stride stride_b); unused without HAS_BIAS
    Y_ptr,  # output, shape (M, C), contiguous
    M,
    C,
    stride_xm,
    stride_xc,
    stride_b,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    z = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS_ptr + cols * stride_b, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # one cast back to the output dtype
    tl.store(Y_ptr + rows[:, None] * C + cols[None, :], gelu(z, TANH).to(Y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    GY_ptr,  # gradient of y, shape (M, C), any strides (stride 0 for an expanded gradient)
    X_ptr,  # input, shape (M, C), any strides
    BIAS_ptr,  # bias, shape (C,); unused without HAS_BIAS
    GX_ptr,  # gradient of x, shape (M, C), contiguous
    GB_ptr,  # partial bias gradients, shape (n_row_progs, C) float32; unused without HAS_BIAS
    M,
    C,
    stride_gm,
    stride_gc,
    stride_xm,
    stride_xc,
    stride_b,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    n_row_progs = tl.num_programs(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + cols * stride_b, mask=mask_c, other=0.0).to(tl.float32)
    gb = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(pid_r * BLOCK_M, M, n_row_progs * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows < M)[:, None] & mask_c[None, :]
        z = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask,
                    other=0.0).to(tl.float32) + bias[None, :]
        gy = tl.load(GY_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gc, mask=mask,
                     other=0.0).to(tl.float32)
        gz = gy * gelu_grad(z, TANH)
        tl.store(GX_ptr + rows[:, None] * C + cols[None, :], gz.to(GX_ptr.dtype.element_ty),
                 mask=mask)
        gb += tl.sum(gz, axis=0)  # masked rows contribute gy = 0
    if HAS_BIAS:
        tl.store(GB_ptr + pid_r * C + cols, gb, mask=mask_c)


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """x (M, C) (any strides), bias (C,) | None -> y (M, C) contiguous, x.dtype."""
    M, C = x.shape
    y = torch.empty(M, C, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    bm, bc = _tiles(C)
    b = bias if bias is not None else x
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    _bias_gelu_fwd_kernel[grid](x, b, y, M, C, x.stride(0), x.stride(1),
                                bias.stride(0) if bias is not None else 0,
                                HAS_BIAS=bias is not None, TANH=approximate == "tanh",
                                BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    return y


def _row_programs(M: int, bm: int, n_col_blocks: int, device) -> int:
    blocks = triton.cdiv(M, bm)
    if INTERPRETING:
        return min(blocks, 3)
    return max(1, min(blocks, triton.cdiv(4 * sm_count(device), n_col_blocks)))


def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       approximate: str):
    """-> (grad_x (M, C) contiguous in x.dtype, grad_bias (C,) in bias.dtype or empty)."""
    M, C = x.shape
    gx = torch.empty(M, C, device=x.device, dtype=x.dtype)
    if bias is None:
        gb_out = x.new_empty(0)
    if M == 0:
        return gx, (torch.zeros_like(bias) if bias is not None else gb_out)
    bm, bc = _tiles(C)
    n_cb = triton.cdiv(C, bc)
    n_rp = _row_programs(M, bm, n_cb, x.device)
    partial = torch.empty(n_rp, C, device=x.device, dtype=torch.float32) if bias is not None \
        else gx
    b = bias if bias is not None else x
    _bias_gelu_bwd_kernel[(n_rp, n_cb)](
        grad_y, x, b, gx, partial, M, C, grad_y.stride(0), grad_y.stride(1), x.stride(0),
        x.stride(1), bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None,
        TANH=approximate == "tanh", BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    if bias is not None:
        gb_out = partial.sum(0).to(bias.dtype)
    return gx, gb_out
