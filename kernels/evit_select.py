"""Triton kernels for EViT token reorganization (``xray_ops.evit_select``), forward and backward.

One pass over the tokens each way, no intermediate tensors in HBM: every program ranks the
patch tokens it handles against the whole cls_attn row (rank = how many tokens come first in a
stable descending order, NaN first), then scatters kept tokens to their output slot and folds
dropped ones into the fused token.

Forward grid: (B, C blocks) — the fused token is a reduction over tokens, so a program owns a
slice of channels and walks every token. Backward grid: (B, token blocks) — grad_cls is a
reduction over channels, so a program owns a block of tokens and walks every channel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Autotuned on the GPU; the interpreter (TRITON_INTERPRET=1, read at import like @triton.jit)
# would time every config, so it gets the first one only.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(space):
    cfgs = [triton.Config(dict(kw), num_warps=w) for kw, w in space]
    return cfgs[:1] if _INTERPRET else cfgs


# forward: channels per program (more channels = fewer redundant rankings of the row)
_FWD_SPACE = [((("BLOCK_C", 256), ("BLOCK_J", 16)), 4), ((("BLOCK_C", 128), ("BLOCK_J", 16)), 4),
              ((("BLOCK_C", 512), ("BLOCK_J", 16)), 8), ((("BLOCK_C", 256), ("BLOCK_J", 32)), 8),
              ((("BLOCK_C", 1024), ("BLOCK_J", 8)), 8)]
# backward: tokens per program (the grid) and channels per step
_BWD_SPACE = [((("BLOCK_J", 16), ("BLOCK_C", 128)), 4), ((("BLOCK_J", 8), ("BLOCK_C", 256)), 4),
              ((("BLOCK_J", 32), ("BLOCK_C", 128)), 8), ((("BLOCK_J", 16), ("BLOCK_C", 256)), 8)]


@triton.jit
def _rank_in_row(
    A_row_ptr,  # cls_attn row b, shape (P,)
    stride_ap,
    a_j,  # the values being ranked, shape (BLOCK_J,)
    offs_j,  # their indices, shape (BLOCK_J,)
    P,
    BLOCK_I: tl.constexpr,
):
    """Position of each a_j in the stable descending order of the row (NaN above numbers)."""
    rank = tl.zeros(a_j.shape, dtype=tl.int32)
    nan_j = a_j != a_j
    for i0 in range(0, P, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        a_i = tl.load(A_row_ptr + offs_i * stride_ap, mask=offs_i < P, other=0)
        ai = a_i[:, None]
        aj = a_j[None, :]
        nan_i = ai != ai
        greater = (ai > aj) | (nan_i & ~nan_j[None, :])
        equal = (ai == aj) | (nan_i & nan_j[None, :])
        # token i precedes token j: larger, or equal with a lower index (stable sort)
        first = greater | (equal & (offs_i[:, None] < offs_j[None, :]))
        first = first & (offs_i[:, None] < P)
        rank += tl.sum(first.to(tl.int32), axis=0)
    return rank


def p_bucket(P: int) -> int:
    """The autotuner's view of the row length: the power of two >= P (at least 16), so the
    tuning is shared by nearby lengths; `keep` is not part of it (it moves work between copying
    and fusing, not the cost), so EViT's keep-rate schedule does not re-tune."""
    return triton.next_power_of_2(max(P, 16))


# tuned per (bucketed row length, channels); dtypes join Triton's own key
_KEY = ["P_BUCKET", "C"]


@triton.autotune(configs=_configs(_FWD_SPACE), key=_KEY)
@triton.jit
def _evit_select_fwd_kernel(
    X_ptr,  # tokens, shape (B, N, C), any strides
    A_ptr,  # cls_attn, shape (B, P), P = N - 1, any strides
    OUT_ptr,  # output tokens, shape (B, 1 + keep + FUSE, C), contiguous
    IDX_ptr,  # keep_idx, shape (B, keep), int64, contiguous
    P,
    C,
    keep,
    P_BUCKET,  # p_bucket(P): the autotuner's key, unused in the body
    stride_xb,
    stride_xn,
    stride_xc,
    stride_ab,
    stride_ap,
    stride_ob,
    stride_on,
    FUSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 inputs
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_row = X_ptr + b * stride_xb
    a_row = A_ptr + b * stride_ab
    out_row = OUT_ptr + b * stride_ob

    cls = tl.load(x_row + offs_c * stride_xc, mask=mask_c)
    tl.store(out_row + offs_c, cls, mask=mask_c)

    fused = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for j0 in range(0, P, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < P
        a_j = tl.load(a_row + offs_j * stride_ap, mask=mask_j, other=0)
        rank = _rank_in_row(a_row, stride_ap, a_j, offs_j, P, BLOCK_I)
        kept = mask_j & (rank < keep)
        tile_mask = mask_j[:, None] & mask_c[None, :]
        x_j = tl.load(x_row + (1 + offs_j)[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                      mask=tile_mask, other=0)
        # kept token j lands in output slot 1 + rank(j): ranks are a permutation, no conflicts
        tl.store(out_row + (1 + rank)[:, None] * stride_on + offs_c[None, :], x_j,
                 mask=kept[:, None] & mask_c[None, :])
        if pid_c == 0:
            tl.store(IDX_ptr + b * keep + rank, offs_j.to(tl.int64), mask=kept)
        if FUSE:
            dropped = mask_j & (rank >= keep)
            # where, not a multiply by 0: a NaN in a kept token must not reach the fused one
            w = tl.where(dropped, a_j, 0).to(ACC_DTYPE)
            contrib = tl.where(dropped[:, None], w[:, None] * x_j.to(ACC_DTYPE), 0)
            fused += tl.sum(contrib, axis=0)
    if FUSE:
        # one cast back to the output dtype
        tl.store(out_row + (1 + keep) * stride_on + offs_c,
                 fused.to(OUT_ptr.dtype.element_ty), mask=mask_c)


@triton.autotune(configs=_configs(_BWD_SPACE), key=_KEY)
@triton.jit
def _evit_select_bwd_kernel(
    GO_ptr,  # grad of x_out, shape (B, 1 + keep + FUSE, C), any strides (may be expanded)
    X_ptr,  # tokens, shape (B, N, C), any strides
    A_ptr,  # cls_attn, shape (B, P), any strides
    GX_ptr,  # grad of x, shape (B, N, C), contiguous
    GA_ptr,  # grad of cls_attn, shape (B, P), contiguous
    P,
    C,
    keep,
    P_BUCKET,  # p_bucket(P): the autotuner's key, unused in the body
    stride_gb,
    stride_gn,
    stride_gc,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_ab,
    stride_ap,
    FUSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < P
    a_row = A_ptr + b * stride_ab
    a_j = tl.load(a_row + offs_j * stride_ap, mask=mask_j, other=0)
    rank = _rank_in_row(a_row, stride_ap, a_j, offs_j, P, BLOCK_I)
    kept = mask_j & (rank < keep)
    dropped = mask_j & (rank >= keep)
    go_row = GO_ptr + b * stride_gb
    x_row = X_ptr + b * stride_xb
    gx_row = GX_ptr + b * (P + 1) * C

    g_cls = tl.zeros([BLOCK_J], dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if pid_j == 0:  # the CLS token's gradient passes through
            g0 = tl.load(go_row + offs_c * stride_gc, mask=mask_c)
            tl.store(gx_row + offs_c, g0, mask=mask_c)
        g = tl.load(go_row + (1 + rank)[:, None] * stride_gn + offs_c[None, :] * stride_gc,
                    mask=kept[:, None] & mask_c[None, :], other=0).to(ACC_DTYPE)
        if FUSE:
            g_fused = tl.load(go_row + (1 + keep) * stride_gn + offs_c * stride_gc,
                              mask=mask_c, other=0).to(ACC_DTYPE)
            drop_mask = dropped[:, None] & mask_c[None, :]
            x_j = tl.load(x_row + (1 + offs_j)[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                          mask=drop_mask, other=0).to(ACC_DTYPE)
            g_cls += tl.sum(tl.where(drop_mask, x_j * g_fused[None, :], 0), axis=1)
            g = tl.where(drop_mask, a_j.to(ACC_DTYPE)[:, None] * g_fused[None, :], g)
        tl.store(gx_row + (1 + offs_j)[:, None] * C + offs_c[None, :],
                 g.to(GX_ptr.dtype.element_ty), mask=mask_j[:, None] & mask_c[None, :])
    tl.store(GA_ptr + b * P + offs_j, g_cls.to(GA_ptr.dtype.element_ty), mask=mask_j)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def evit_select_forward(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool):
    """x (B, N, C), cls_attn (B, N-1) -> (x_out (B, 1+keep+fuse, C), keep_idx (B, keep))."""
    B, N, C = x.shape
    P = N - 1
    out = torch.empty(B, 1 + keep + int(fuse), C, device=x.device, dtype=x.dtype)
    idx = torch.empty(B, keep, device=x.device, dtype=torch.int64)
    if B == 0:
        return out, idx
    # C == 0 still needs one program per row to write keep_idx
    def grid(meta):
        return (B, max(1, triton.cdiv(C, meta["BLOCK_C"])))

    _evit_select_fwd_kernel[grid](
        x, cls_attn, out, idx, P, C, keep, p_bucket(P),
        x.stride(0), x.stride(1), x.stride(2), cls_attn.stride(0), cls_attn.stride(1),
        out.stride(0), out.stride(1),
        FUSE=fuse, ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_I=64,
    )
    return out, idx


def evit_select_backward(grad_out: torch.Tensor, x: torch.Tensor, cls_attn: torch.Tensor,
                         keep: int, fuse: bool):
    """grad_out (B, 1+keep+fuse, C) -> (grad_x (B, N, C), grad_cls (B, N-1)), both contiguous."""
    B, N, C = x.shape
    P = N - 1
    grad_x = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    grad_a = torch.empty(B, P, device=x.device, dtype=cls_attn.dtype)
    if B == 0:
        return grad_x, grad_a
    def grid(meta):
        return (B, triton.cdiv(P, meta["BLOCK_J"]))

    _evit_select_bwd_kernel[grid](
        grad_out, x, cls_attn, grad_x, grad_a, P, C, keep, p_bucket(P),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        x.stride(0), x.stride(1), x.stride(2), cls_attn.stride(0), cls_attn.stride(1),
        FUSE=fuse, ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_I=64,
    )
    return grad_x, grad_a
