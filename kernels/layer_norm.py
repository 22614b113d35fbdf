"""Triton kernels for ``layer_norm`` with a fused residual add and LayerScale.

Forward: a program normalizes BLOCK_M whole rows held in registers (BLOCK_C >= C):
s = residual + gamma · x (rounded to the stream dtype and stored), mean and rstd in float32,
y = (s - mean) · rstd · weight + bias, one cast to the output dtype. Reads x (and residual)
once, writes y (and s) once.

Backward: each of n_row_progs programs walks every n_row_progs-th block of rows, writes
ds_total (and dx = ds_total · gamma) for them, and keeps the column sums of d weight, d bias
and d gamma in registers; those partials go to (n_row_progs, C) float32 buffers that the
launcher sums (fixed order: deterministic, no atomics). Rows wider than BWD_MAX_C take a
chunked two-pass kernel whose column sums accumulate in the program's own partial row.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import sm_count

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# a whole row stays in registers: C up to this many channels (16 warps, 16 floats a thread
# per row tensor)
MAX_C = 8192
# the backward holds more row tensors: wider rows take the chunked two-pass kernel (which
# spills nothing at sm_90, where the one-pass one spills from 8192 channels)
BWD_MAX_C = 4096
WIDE_CHUNK = 1024 if INTERPRETING else 2048


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr,  # branch input, shape (M, C), any strides
    R_ptr,  # residual, shape (M, C), any strides; unused without HAS_RESIDUAL
    G_ptr,  # LayerScale gamma, shape (C,) (stride stride_g); unused without HAS_SCALE
    W_ptr,  # weight, shape (C,) (stride stride_w); unused without HAS_W
    B_ptr,  # bias, shape (C,) (stride stride_b); unused without HAS_B
    Y_ptr,  # output, shape (M, C), contiguous
    S_ptr,  # new residual stream, shape (M, C), contiguous; unused without HAS_RESIDUAL
    MEAN_ptr,  # float32, shape (M,)
    RSTD_ptr,  # float32, shape (M,)
    M,
    C,
    eps,
    stride_xm,
    stride_xc,
    stride_rm,
    stride_rc,
    stride_g,
    stride_w,
    stride_b,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
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
    s = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        if HAS_SCALE:
            s = s * tl.load(G_ptr + cols * stride_g, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        s += tl.load(R_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rc, mask=mask,
                     other=0.0).to(tl.float32)
        # the stream is kept in its dtype: normalize the rounded value (as eager would)
        s_out = s.to(S_ptr.dtype.element_ty)
        tl.store(S_ptr + rows[:, None] * C + cols[None, :], s_out, mask=mask)
        s = s_out.to(tl.float32)
    mean = tl.sum(s, axis=1) / C
    d = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W_ptr + cols * stride_w, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B_ptr + cols * stride_b, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # one cast back to the output dtype
    tl.store(Y_ptr + rows[:, None] * C + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(MEAN_ptr + rows, mean, mask=mask_m)
    tl.store(RSTD_ptr + rows, rstd, mask=mask_m)


@triton.jit
def _layer_norm_bwd_kernel(
    GY_ptr,  # gradient of y, shape (M, C), any strides (stride 0 when expanded)
    GS_ptr,  # gradient of s, shape (M, C), any strides; unused without HAS_GS
    S_ptr,  # the normalized input s (x without a residual), shape (M, C), any strides
    X_ptr,  # branch input x, shape (M, C), any strides; unused without HAS_SCALE
    G_ptr,  # gamma (C,); unused without HAS_SCALE
    W_ptr,  # weight (C,); unused without HAS_W
    MEAN_ptr,  # float32 (M,)
    RSTD_ptr,  # float32 (M,)
    DS_ptr,  # ds_total, shape (M, C), contiguous, s's dtype
    DX_ptr,  # dx = ds_total · gamma, shape (M, C), contiguous; unused without HAS_SCALE
    DW_ptr,  # partial d weight, shape (n_row_progs, C) float32; unused without HAS_W
    DB_ptr,  # partial d bias, shape (n_row_progs, C) float32; unused without HAS_B
    DG_ptr,  # partial d gamma, shape (n_row_progs, C) float32; unused without HAS_SCALE
    M,
    C,
    stride_gym,
    stride_gyc,
    stride_gsm,
    stride_gsc,
    stride_sm,
    stride_sc,
    stride_xm,
    stride_xc,
    stride_g,
    stride_w,
    HAS_GS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    n_row_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(pid_r * BLOCK_M, M, n_row_progs * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_c[None, :]
        s = tl.load(S_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sc, mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(GY_ptr + rows[:, None] * stride_gym + cols[None, :] * stride_gyc, mask=mask,
                     other=0.0).to(tl.float32)
        mean = tl.load(MEAN_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(RSTD_ptr + rows, mask=mask_m, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g_hat = dy
        if HAS_W:  # reloaded per row block (from L1) rather than held: fewer live registers
            g_hat = dy * tl.load(W_ptr + cols * stride_w, mask=mask_c, other=0.0).to(
                tl.float32)[None, :]
        c1 = tl.sum(g_hat * xhat, axis=1) / C
        c2 = tl.sum(g_hat, axis=1) / C
        ds = rstd[:, None] * (g_hat - c2[:, None] - xhat * c1[:, None])
        if HAS_GS:
            ds += tl.load(GS_ptr + rows[:, None] * stride_gsm + cols[None, :] * stride_gsc,
                          mask=mask, other=0.0).to(tl.float32)
        tl.store(DS_ptr + rows[:, None] * C + cols[None, :], ds.to(DS_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_SCALE:
            g = tl.load(G_ptr + cols * stride_g, mask=mask_c, other=0.0).to(tl.float32)
            tl.store(DX_ptr + rows[:, None] * C + cols[None, :],
                     (ds * g[None, :]).to(DX_ptr.dtype.element_ty), mask=mask)
            x = tl.load(X_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask,
                        other=0.0).to(tl.float32)
            dg += tl.sum(tl.where(mask, ds * x, 0.0), axis=0)
    if HAS_W:
        tl.store(DW_ptr + pid_r * C + cols, dw, mask=mask_c)
    if HAS_B:
        tl.store(DB_ptr + pid_r * C + cols, db, mask=mask_c)
    if HAS_SCALE:
        tl.store(DG_ptr + pid_r * C + cols, dg, mask=mask_c)


@triton.jit
def _layer_norm_bwd_wide_kernel(
    GY_ptr,  # as _layer_norm_bwd_kernel
    GS_ptr,
    S_ptr,
    X_ptr,
    G_ptr,
    W_ptr,
    MEAN_ptr,
    RSTD_ptr,
    DS_ptr,
    DX_ptr,
    DW_ptr,  # partial sums, shape (n_row_progs, C) float32, zeros: accumulated in place
    DB_ptr,
    DG_ptr,
    M,
    C,
    stride_gym,
    stride_gyc,
    stride_gsm,
    stride_gsc,
    stride_sm,
    stride_sc,
    stride_xm,
    stride_xc,
    stride_g,
    stride_w,
    HAS_GS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr,  # a chunk of a row
):
    """Rows wider than a program's registers: one row at a time in BLOCK_C chunks, two passes
    (the row sums, then the gradients, reading the row again from L2); the column sums go
    straight to this program's own row of the partial buffers."""
    pid_r = tl.program_id(0)
    n_row_progs = tl.num_programs(0)
    ks = tl.arange(0, BLOCK_C)
    row = pid_r.to(tl.int64) - n_row_progs  # int64 offsets for large tensors
    for _ in range(pid_r, M, n_row_progs):
        row += n_row_progs
        mean = tl.load(MEAN_ptr + row)
        rstd = tl.load(RSTD_ptr + row)
        c1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):  # a runtime loop: unrolled, the chunks' loads pile up
            cols = c0 + ks
            mask = cols < C
            s = tl.load(S_ptr + row * stride_sm + cols * stride_sc, mask=mask, other=0.0)
            dy = tl.load(GY_ptr + row * stride_gym + cols * stride_gyc, mask=mask, other=0.0)
            xhat = tl.where(mask, (s.to(tl.float32) - mean) * rstd, 0.0)
            g_hat = dy.to(tl.float32)
            if HAS_W:
                g_hat = g_hat * tl.load(W_ptr + cols * stride_w, mask=mask, other=0.0).to(
                    tl.float32)
            c1 += g_hat * xhat
            c2 += g_hat
        c1_row = tl.sum(c1, axis=0) / C
        c2_row = tl.sum(c2, axis=0) / C
        for c0 in range(0, C, BLOCK_C):  # a runtime loop: unrolled, the chunks' loads pile up
            cols = c0 + ks
            mask = cols < C
            s = tl.load(S_ptr + row * stride_sm + cols * stride_sc, mask=mask, other=0.0)
            dy = tl.load(GY_ptr + row * stride_gym + cols * stride_gyc, mask=mask,
                         other=0.0).to(tl.float32)
            xhat = tl.where(mask, (s.to(tl.float32) - mean) * rstd, 0.0)
            g_hat = dy
            if HAS_W:
                g_hat = dy * tl.load(W_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
            ds = rstd * (g_hat - c2_row - xhat * c1_row)
            if HAS_GS:
                ds += tl.load(GS_ptr + row * stride_gsm + cols * stride_gsc, mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(DS_ptr + row * C + cols, ds.to(DS_ptr.dtype.element_ty), mask=mask)
            part = pid_r * C + cols
            if HAS_SCALE:
                g = tl.load(G_ptr + cols * stride_g, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX_ptr + row * C + cols, (ds * g).to(DX_ptr.dtype.element_ty), mask=mask)
                x = tl.load(X_ptr + row * stride_xm + cols * stride_xc, mask=mask,
                            other=0.0).to(tl.float32)
                tl.store(DG_ptr + part, tl.load(DG_ptr + part, mask=mask) + ds * x, mask=mask)
            if HAS_W:
                tl.store(DW_ptr + part, tl.load(DW_ptr + part, mask=mask) + dy * xhat, mask=mask)
            if HAS_B:
                tl.store(DB_ptr + part, tl.load(DB_ptr + part, mask=mask) + dy, mask=mask)


def _warps(block_c: int) -> int:
    return 16 if block_c >= 8192 else 8 if block_c >= 2048 else 4


def _block(C: int, backward: bool = False):
    """(BLOCK_M, BLOCK_C): whole rows; about 4K elements a forward program, 1K a backward one
    (it holds five row tiles and three column sums: more spills at sm_90)."""
    block_c = triton.next_power_of_2(C)
    if INTERPRETING:
        return min(4, max(1, 256 // block_c)), block_c
    return max(1, (1024 if backward else 4096) // block_c), block_c


def layer_norm_forward(x, weight, bias, eps, residual, residual_scale):
    """x (M, C) -> (y, s or empty, mean (M,) float32, rstd (M,) float32); see the module doc."""
    M, C = x.shape
    y = torch.empty(M, C, device=x.device, dtype=x.dtype)
    has_r = residual is not None
    s = torch.empty(M, C, device=x.device, dtype=x.dtype) if has_r else x.new_empty(0)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s, mean, rstd
    bm, bc = _block(C)
    r = residual if has_r else x
    _layer_norm_fwd_kernel[(triton.cdiv(M, bm),)](
        x, r, _or(residual_scale, x), _or(weight, x), _or(bias, x), y, s if has_r else y, mean,
        rstd, M, C, eps, x.stride(0), x.stride(1), r.stride(0), r.stride(1),
        _stride(residual_scale), _stride(weight), _stride(bias),
        HAS_RESIDUAL=has_r, HAS_SCALE=residual_scale is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, BLOCK_M=bm, BLOCK_C=bc, num_warps=_warps(bc))
    return y, s, mean, rstd


def layer_norm_backward(grad_y, grad_s, x, branch, weight, bias, residual_scale, mean, rstd):
    """Gradients of :func:`layer_norm_forward`: x is the LayerNorm's input (s, or the forward's
    x without a residual), branch the forward's x (given with residual_scale). See
    xray_ops.ops.layer_norm_backends for the inputs and outputs."""
    s = x
    M, C = s.shape
    has_g = residual_scale is not None
    ds = torch.empty(M, C, device=s.device, dtype=s.dtype)
    dx = torch.empty(M, C, device=s.device, dtype=s.dtype) if has_g else s.new_empty(0)
    bm, bc = _block(C, backward=True)
    n_rp = _row_programs(M, bm if bc <= BWD_MAX_C else 1, s.device)
    f32 = dict(device=s.device, dtype=torch.float32)
    dw = torch.zeros(n_rp, C, **f32) if weight is not None else None
    db = torch.zeros(n_rp, C, **f32) if bias is not None else None
    dg = torch.zeros(n_rp, C, **f32) if has_g else None
    if M:
        gs = grad_s if grad_s is not None else grad_y
        xx = branch if has_g else s
        args = (grad_y, gs, s, xx, _or(residual_scale, s), _or(weight, s), mean, rstd, ds,
                dx if has_g else ds, _or(dw, ds), _or(db, ds), _or(dg, ds), M, C,
                grad_y.stride(0), grad_y.stride(1), gs.stride(0), gs.stride(1), s.stride(0),
                s.stride(1), xx.stride(0), xx.stride(1), _stride(residual_scale),
                _stride(weight))
        flags = dict(HAS_GS=grad_s is not None, HAS_SCALE=has_g, HAS_W=weight is not None,
                     HAS_B=bias is not None)
        if bc > BWD_MAX_C:
            # one stage: pipelining the chunk loops only adds live registers (8 B spill at sm_90)
            _layer_norm_bwd_wide_kernel[(n_rp,)](*args, **flags, BLOCK_C=WIDE_CHUNK, num_warps=8,
                                                 num_stages=1)
        else:
            _layer_norm_bwd_kernel[(n_rp,)](*args, **flags, BLOCK_M=bm, BLOCK_C=bc,
                                            num_warps=_warps(bc))

    def total(part, p):
        return part.sum(0).to(p.dtype) if p is not None else s.new_empty(0)

    return ds, dx, total(dw, weight), total(db, bias), total(dg, residual_scale)


def _row_programs(M: int, bm: int, device) -> int:
    blocks = max(1, triton.cdiv(M, bm))
    if INTERPRETING:
        return min(blocks, 3)
    return min(blocks, 4 * sm_count(device))



def _or(t, fallback):
    return t if t is not None else fallback


def _stride(t) -> int:
    return t.stride(0) if t is not None else 0
