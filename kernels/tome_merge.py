"""Triton kernels for ToMe's size-weighted merge (``xray_ops.tome_merge``), forward and backward.

Both are gathers, so neither needs atomics and two runs are bitwise equal:

Forward, grid (B x slot blocks, channel blocks): every output slot walks its own group of input
tokens (the CSR slot_src / slot_start from the matching: the slot's token first, then the A
tokens merged into it by ascending position), accumulates size·x and size in fp32 (float64 for
float64), and writes sum(size·x) / sum(size) and sum(size) once. x is read once in total.

Backward, grid (B x token blocks,): every input token p reads the gradient of its slot
o = dest[p]: grad_x[p] = size[p] / size_out[o] · grad_out[o], and (when size needs a gradient)
grad_size[p] = <grad_out[o], x[p] - x_out[o]> / size_out[o] + grad_size_out[o].
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _batch_block(n, BLOCK: tl.constexpr):
    """(b, block) from one flat grid axis over (batch, blocks of n tokens): axis 0 has no
    65535 limit, so any token count launches (a 2-D grid capped N at 65535 blocks)."""
    pid = tl.program_id(0)
    num = tl.cdiv(n, BLOCK)
    return (pid // num).to(tl.int64), pid % num


@triton.jit
def _tome_merge_fwd_kernel(
    X_ptr,  # tokens, shape (B, N, C), any strides
    S_ptr,  # sizes, shape (B, N, 1), any strides (unused without HAS_SIZE)
    SRC_ptr,  # slot_src, shape (B, N), int64, contiguous
    START_ptr,  # slot_start, shape (B, n_out + 1), int64, contiguous
    OUT_ptr,  # merged tokens, shape (B, n_out, C), contiguous
    SOUT_ptr,  # merged sizes, shape (B, n_out, 1), contiguous
    N,
    C,
    n_out,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    HAS_SIZE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, blk = _batch_block(n_out, BLOCK_T)
    offs_o = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_o = offs_o < n_out
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start_row = START_ptr + b * (n_out + 1)
    st = tl.load(start_row + offs_o, mask=mask_o, other=0)
    cnt = tl.load(start_row + offs_o + 1, mask=mask_o, other=0) - st
    x_row = X_ptr + b * stride_xb

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC_DTYPE)
    total = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    # a fixed order per slot (its group order): the sum is the same bits on every run
    for t in range(0, tl.max(cnt, axis=0)):
        valid = t < cnt
        p = tl.load(SRC_ptr + b * N + st + t, mask=valid, other=0)
        if HAS_SIZE:
            s = tl.load(S_ptr + b * stride_sb + p * stride_sn, mask=valid, other=0).to(ACC_DTYPE)
        else:
            s = valid.to(ACC_DTYPE)
        xv = tl.load(x_row + p[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=valid[:, None] & mask_c[None, :], other=0).to(ACC_DTYPE)
        acc += s[:, None] * xv
        total += s
    out = acc / tl.where(mask_o, total, 1)[:, None]  # padding slots: no 0/0
    # one cast back to the output dtype
    tl.store(OUT_ptr + b * n_out * C + offs_o[:, None] * C + offs_c[None, :],
             out.to(OUT_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_c[None, :])
    if tl.program_id(1) == 0:
        tl.store(SOUT_ptr + b * n_out + offs_o, total.to(SOUT_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def _tome_merge_bwd_kernel(
    GO_ptr,  # grad of x_out, shape (B, n_out, C), any strides (may be expanded)
    GSO_ptr,  # grad of size_out, shape (B, n_out, 1), any strides (unused without HAS_GSO)
    X_ptr,  # tokens, shape (B, N, C), any strides
    S_ptr,  # sizes, shape (B, N, 1), any strides (unused without HAS_SIZE)
    OUT_ptr,  # x_out, shape (B, n_out, C), any strides
    SOUT_ptr,  # size_out, shape (B, n_out, 1), any strides
    DEST_ptr,  # dest, shape (B, N), int64, contiguous
    GX_ptr,  # grad of x, shape (B, N, C), contiguous
    GS_ptr,  # grad of size, shape (B, N, 1), contiguous
    N,
    C,
    stride_gb,
    stride_gn,
    stride_gc,
    stride_gsb,
    stride_gsn,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    stride_ob,
    stride_on,
    stride_oc,
    stride_sob,
    stride_son,
    HAS_SIZE: tl.constexpr,
    HAS_GSO: tl.constexpr,
    SIZE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, blk = _batch_block(N, BLOCK_T)
    offs_p = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_p = offs_p < N
    o = tl.load(DEST_ptr + b * N + offs_p, mask=mask_p, other=0)
    S = tl.load(SOUT_ptr + b * stride_sob + o * stride_son, mask=mask_p, other=1).to(ACC_DTYPE)
    if HAS_SIZE:
        s = tl.load(S_ptr + b * stride_sb + offs_p * stride_sn, mask=mask_p, other=0).to(ACC_DTYPE)
    else:
        s = tl.full([BLOCK_T], 1, dtype=ACC_DTYPE)
    w = s / S
    go_rows = GO_ptr + b * stride_gb + o * stride_gn
    out_rows = OUT_ptr + b * stride_ob + o * stride_on
    x_rows = X_ptr + b * stride_xb + offs_p * stride_xn
    gx_rows = GX_ptr + b * N * C + offs_p.to(tl.int64) * C
    dot = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = mask_p[:, None] & (offs_c < C)[None, :]
        g = tl.load(go_rows[:, None] + offs_c[None, :] * stride_gc, mask=m, other=0).to(ACC_DTYPE)
        tl.store(gx_rows[:, None] + offs_c[None, :], (w[:, None] * g).to(GX_ptr.dtype.element_ty),
                 mask=m)
        if SIZE_GRAD:
            xv = tl.load(x_rows[:, None] + offs_c[None, :] * stride_xc, mask=m,
                         other=0).to(ACC_DTYPE)
            ov = tl.load(out_rows[:, None] + offs_c[None, :] * stride_oc, mask=m,
                         other=0).to(ACC_DTYPE)
            dot += tl.sum(g * (xv - ov), axis=1)
    if SIZE_GRAD:
        gs = dot / S
        if HAS_GSO:
            gs += tl.load(GSO_ptr + b * stride_gsb + o * stride_gsn, mask=mask_p,
                          other=0).to(ACC_DTYPE)
    else:
        gs = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    tl.store(GS_ptr + b * N + offs_p, gs.to(GS_ptr.dtype.element_ty), mask=mask_p)


def _block_t() -> int:
    # tokens per program; under the interpreter (a Python cost per tl op, whatever the block)
    # bigger blocks mean fewer programs
    return 64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 16


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_c(C: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(C, 1))))


def tome_merge_forward(x: torch.Tensor, size, dest: torch.Tensor, slot_src: torch.Tensor,
                       slot_start: torch.Tensor):
    """x (B, N, C), size (B, N, 1) or None, matching CSR -> (x_out (B, n_out, C),
    size_out (B, n_out, 1)), contiguous, x's dtype."""
    B, N, C = x.shape
    n_out = slot_start.shape[1] - 1
    out = torch.empty(B, n_out, C, device=x.device, dtype=x.dtype)
    size_out = torch.empty(B, n_out, 1, device=x.device, dtype=x.dtype)
    if B == 0 or n_out == 0:
        return out, size_out
    slot_src, slot_start = slot_src.contiguous(), slot_start.contiguous()
    s = size if size is not None else x  # a placeholder pointer when there is no size
    BLOCK_T = _block_t()
    BLOCK_C = _block_c(C, 128)
    # C == 0 still needs one program per slot block to write size_out
    grid = (B * triton.cdiv(n_out, BLOCK_T), max(1, triton.cdiv(C, BLOCK_C)))
    _tome_merge_fwd_kernel[grid](
        x, s, slot_src, slot_start, out, size_out, N, C, n_out,
        x.stride(0), x.stride(1), x.stride(2), s.stride(0), s.stride(1),
        HAS_SIZE=size is not None, ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C, num_warps=4,
    )
    return out, size_out


def tome_merge_backward(grad_out: torch.Tensor, grad_size_out, x: torch.Tensor, size,
                        x_out: torch.Tensor, size_out: torch.Tensor, dest: torch.Tensor,
                        size_grad: bool):
    """-> (grad_x (B, N, C), grad_size (B, N, 1)), contiguous; grad_size is zeros unless
    size_grad."""
    B, N, C = x.shape
    grad_x = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    grad_size = torch.empty(B, N, 1, device=x.device, dtype=x.dtype)
    if B == 0 or N == 0:
        return grad_x, grad_size
    dest = dest.contiguous()
    s = size if size is not None else x
    gso = grad_size_out if grad_size_out is not None else size_out
    size_grad = bool(size_grad) and size is not None
    BLOCK_T = _block_t()
    grid = (B * triton.cdiv(N, BLOCK_T),)
    _tome_merge_bwd_kernel[grid](
        grad_out, gso, x, s, x_out, size_out, dest, grad_x, grad_size, N, C,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), gso.stride(0), gso.stride(1),
        x.stride(0), x.stride(1), x.stride(2), s.stride(0), s.stride(1),
        x_out.stride(0), x_out.stride(1), x_out.stride(2), size_out.stride(0), size_out.stride(1),
        HAS_SIZE=size is not None, HAS_GSO=grad_size_out is not None, SIZE_GRAD=size_grad,
        ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_T=BLOCK_T, BLOCK_C=_block_c(C, 128), num_warps=4,
    )
    return grad_x, grad_size
