"""Triton kernels for ToMe's bipartite soft matching (``xray_ops.tome_match``).

Four launches, all parallel over (batch, token blocks); the (Na, Nb) score matrix never
reaches HBM:

0. normalize: every token as the definition normalises it (xray_ops.reference.tome
   .tome_normalize): scaled by a power of two that brings its largest |value| into [1, 2), then
   divided by its norm, so no square underflows or overflows at any finite magnitude. Writes the
   unit rows U (B, N, D) in the compute dtype (float32; float64 for float64 metrics).
1. scores: a program owns BLOCK_A A tokens and walks the B tokens in tiles: cosine scores as
   dot products of unit rows with tl.dot (fp32, IEEE; float64 metrics use a multiply-sum),
   protected row / column set to -inf, NaN counted as +inf (larger than every number, as
   torch.max does), and a running row maximum + first argmax. Writes node_max (B, Na) and
   node_idx (B, Na).
2. rank: each A token's position in the stable descending order of node_max (how many tokens
   come first: larger, or equal with a lower index). Writes rank (B, Na).
3. plan: with every rank known, each token computes its output slot and place by counting
   over the A tokens (O(Na) per token, no sort, no atomics): dest, the CSR slot_src /
   slot_start, and ToMe's unm_idx / src_idx / dst_idx.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _power_of_two_scale(amax, IS_F64: tl.constexpr):
    # 2**k bringing amax into [1, 2), k clamped to the normal exponents, built from the bits:
    # amax = 1.f·2**(E - bias) gives k = bias - E (a zero / subnormal amax: E = 0, the largest
    # k; Inf / NaN: the smallest). See xray_ops.reference.tome.power_of_two_scale.
    if IS_F64:
        e = (amax.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        k = tl.minimum(tl.maximum(1023 - e, -1022), 1023)
        return ((k + 1023) << 52).to(tl.float64, bitcast=True)
    else:
        e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        k = tl.minimum(tl.maximum(127 - e, -126), 127)
        return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tome_normalize_kernel(
    M_ptr,  # metric, shape (B, N, D), any strides
    U_ptr,  # unit rows, shape (B, N, D), ACC_DTYPE, contiguous
    N,
    D,
    stride_mb,
    stride_mn,
    stride_md,
    ACC_DTYPE: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    rows = M_ptr + b * stride_mb + offs_t.to(tl.int64) * stride_mn
    out = U_ptr + (b * N + offs_t.to(tl.int64)) * D

    amax = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = tl.load(rows[:, None] + offs_d[None, :] * stride_md,
                    mask=mask_t[:, None] & (offs_d < D)[None, :], other=0).to(ACC_DTYPE)
        amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    scale = _power_of_two_scale(amax, IS_F64)
    ss = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = tl.load(rows[:, None] + offs_d[None, :] * stride_md,
                    mask=mask_t[:, None] & (offs_d < D)[None, :], other=0).to(ACC_DTYPE)
        m = m * scale[:, None]  # exact: a power of two
        ss += tl.sum(m * m, axis=1)
    # a zero row: norm 0, and 0 / 0 = NaN below, as in the definition (padding rows: no 0/0)
    norm = tl.where(mask_t, tl.sqrt(ss), 1)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        m = tl.load(rows[:, None] + offs_d[None, :] * stride_md, mask=mask,
                    other=0).to(ACC_DTYPE)
        tl.store(out[:, None] + offs_d[None, :], (m * scale[:, None]) / norm[:, None], mask=mask)


@triton.jit
def _tome_scores_kernel(
    U_ptr,  # unit rows of the metric, shape (B, N, D), ACC_DTYPE, contiguous
    MAX_ptr,  # node_max, shape (B, Na), ACC_DTYPE, contiguous
    IDX_ptr,  # node_idx, shape (B, Na), int32, contiguous
    N,
    Na,
    Nb,
    D,
    CLASS_TOKEN: tl.constexpr,
    DISTILL_TOKEN: tl.constexpr,
    USE_DOT: tl.constexpr,  # tl.dot in IEEE fp32; False: broadcast multiply-sum (float64)
    ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < Na
    u_row = U_ptr + b * N * D
    a_rows = u_row + (2 * offs_a).to(tl.int64) * D  # A = even positions

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC_DTYPE)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, Nb, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < Nb
        b_rows = u_row + (2 * offs_b + 1).to(tl.int64) * D  # B = odd positions
        s = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            a = tl.load(a_rows[:, None] + offs_d[None, :],
                        mask=mask_a[:, None] & mask_d[None, :], other=0)
            bt = tl.load(b_rows[None, :] + offs_d[:, None],
                         mask=mask_d[:, None] & mask_b[None, :], other=0)
            if USE_DOT:
                # IEEE fp32, not TF32: the matching must not depend on the tensor-core mode
                s = tl.dot(a, bt, s, input_precision="ieee")
            else:
                s += tl.sum(a[:, :, None] * bt[None, :, :], axis=1)
        # the cosine of unit rows is their dot product
        s = tl.where(s != s, float("inf"), s)  # NaN ranks above every number
        if CLASS_TOKEN:
            s = tl.where(offs_a[:, None] == 0, float("-inf"), s)
        if DISTILL_TOKEN:
            s = tl.where(offs_b[None, :] == 0, float("-inf"), s)
        s = tl.where(mask_b[None, :], s, float("-inf"))
        tile_max, tile_idx = tl.max(s, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
        # strictly greater: an equal maximum in a later tile keeps the earlier (lower) index
        better = tile_max > best
        best_idx = tl.where(better, b0 + tile_idx, best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(MAX_ptr + b * Na + offs_a, best, mask=mask_a)
    tl.store(IDX_ptr + b * Na + offs_a, best_idx, mask=mask_a)


@triton.jit
def _tome_rank_kernel(
    MAX_ptr,  # node_max, shape (B, Na), contiguous (NaN already mapped to +inf)
    RANK_ptr,  # rank, shape (B, Na), int32, contiguous
    Na,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < Na
    row = MAX_ptr + b * Na
    key_i = tl.load(row + offs_i, mask=mask_i, other=0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for k0 in range(0, Na, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < Na
        key_k = tl.load(row + offs_k, mask=mask_k, other=0)
        kk = key_k[None, :]
        ki = key_i[:, None]
        # token k comes first: a larger best score, or an equal one and a lower index (stable)
        first = (kk > ki) | ((kk == ki) & (offs_k[None, :] < offs_i[:, None]))
        rank += tl.sum((first & mask_k[None, :]).to(tl.int32), axis=1)
    tl.store(RANK_ptr + b * Na + offs_i, rank, mask=mask_i)


@triton.jit
def _tome_plan_kernel(
    RANK_ptr,  # rank, shape (B, Na), int32, contiguous
    NIDX_ptr,  # node_idx, shape (B, Na), int32, contiguous
    UNM_ptr,  # unm_idx, shape (B, Na - r), int64, contiguous
    SRC_ptr,  # src_idx, shape (B, r), int64, contiguous
    DST_ptr,  # dst_idx, shape (B, r), int64, contiguous
    DEST_ptr,  # dest, shape (B, N), int64, contiguous
    SLOT_SRC_ptr,  # slot_src, shape (B, N), int64, contiguous
    SLOT_START_ptr,  # slot_start, shape (B, N - r + 1), int64, contiguous
    N,
    Na,
    Nb,
    r,
    CLASS_TOKEN: tl.constexpr,
    DISTILL_TOKEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A program owns A tokens i and B tokens j with the same indices offs.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    U = Na - r  # staying A tokens
    n_out = N - r
    mask_i = offs < Na
    mask_j = offs < Nb
    rank_i = tl.load(RANK_ptr + b * Na + offs, mask=mask_i, other=0)
    d_i = tl.load(NIDX_ptr + b * Na + offs, mask=mask_i, other=0)
    merged_i = mask_i & (rank_i < r)

    stay_before_i = tl.zeros([BLOCK_T], dtype=tl.int32)  # staying A tokens with a lower index
    lower_i = tl.zeros([BLOCK_T], dtype=tl.int32)  # merged tokens joining a B token before d_i
    same_before_i = tl.zeros([BLOCK_T], dtype=tl.int32)  # ... joining d_i, lower index
    lower_j = tl.zeros([BLOCK_T], dtype=tl.int32)  # merged tokens joining a B token before j
    into_b0 = tl.zeros([BLOCK_T], dtype=tl.int32)  # merged tokens joining B[0] (distill order)
    for k0 in range(0, Na, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < Na
        rank_k = tl.load(RANK_ptr + b * Na + offs_k, mask=mask_k, other=0)
        d_k = tl.load(NIDX_ptr + b * Na + offs_k, mask=mask_k, other=0)
        mk = (mask_k & (rank_k < r))[None, :]
        dk = d_k[None, :]
        before = offs_k[None, :] < offs[:, None]
        if CLASS_TOKEN:
            stay = (mask_k & (rank_k >= r))[None, :]
            stay_before_i += tl.sum((stay & before).to(tl.int32), axis=1)
        lower_i += tl.sum((mk & (dk < d_i[:, None])).to(tl.int32), axis=1)
        same_before_i += tl.sum((mk & (dk == d_i[:, None]) & before).to(tl.int32), axis=1)
        lower_j += tl.sum((mk & (dk < offs[:, None])).to(tl.int32), axis=1)
        if DISTILL_TOKEN:
            into_b0 += tl.sum((mk & (dk == 0)).to(tl.int32), axis=1)

    # ToMe's output order: [staying A (by index with class_token, else by rank), B tokens];
    # with distill_token B[0] moves to slot 1, right after the first staying A token.
    if CLASS_TOKEN:
        u = stay_before_i
    else:
        u = rank_i - r
    if DISTILL_TOKEN:
        slot_u = tl.where(u >= 1, u + 1, u)
        start_u = tl.where(u >= 1, slot_u + into_b0, slot_u)
        slot_d = tl.where(d_i == 0, 1, U + d_i)
        slot_j = tl.where(offs == 0, 1, U + offs)
    else:
        slot_u = u
        start_u = u
        slot_d = U + d_i
        slot_j = U + offs
    # every slot's group: its own token first, then the merged A tokens by ascending index
    start_d = slot_d + lower_i
    start_j = slot_j + lower_j

    stay_i = mask_i & ~merged_i
    dest_a = tl.where(merged_i, slot_d, slot_u)
    pos_a = tl.where(merged_i, start_d + 1 + same_before_i, start_u)
    tl.store(DEST_ptr + b * N + 2 * offs, dest_a.to(tl.int64), mask=mask_i)
    tl.store(SLOT_SRC_ptr + b * N + pos_a, (2 * offs).to(tl.int64), mask=mask_i)
    tl.store(SLOT_START_ptr + b * (n_out + 1) + slot_u, start_u.to(tl.int64), mask=stay_i)
    tl.store(UNM_ptr + b * U + u, offs.to(tl.int64), mask=stay_i)
    tl.store(SRC_ptr + b * r + rank_i, offs.to(tl.int64), mask=merged_i)
    tl.store(DST_ptr + b * r + rank_i, d_i.to(tl.int64), mask=merged_i)

    tl.store(DEST_ptr + b * N + 2 * offs + 1, slot_j.to(tl.int64), mask=mask_j)
    tl.store(SLOT_SRC_ptr + b * N + start_j, (2 * offs + 1).to(tl.int64), mask=mask_j)
    tl.store(SLOT_START_ptr + b * (n_out + 1) + slot_j, start_j.to(tl.int64), mask=mask_j)
    # the end of the last group
    first = (offs == 0) & (tl.program_id(1) == 0)
    tl.store(SLOT_START_ptr + b * (n_out + 1) + n_out + offs * 0, (offs * 0 + N).to(tl.int64),
             mask=first)


# the scores kernel's channel chunk on the GPU: with (BLOCK_A, BLOCK_B) = (32, 64) its fp32
# register tiles fit for sm_80 and sm_90 at 16 (32 spilled 48 B per thread for sm_80, 64 some
# 4 KB for sm_90; tests/test_tome_triton_compile.py checks ptxas's report)
SCORES_BLOCK_D = 16


def _interpreting() -> bool:
    # Under the interpreter every program costs Python time per tl op whatever its size: bigger
    # blocks, fewer programs (N = 577 still takes several tiles and chunks per row)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tome_match(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool):
    """metric (B, N, D), clamped r >= 1 -> (unm_idx, src_idx, dst_idx, dest, slot_src,
    slot_start), int64 (see xray_ops.ToMeMatch)."""
    B, N, D = metric.shape
    Na, Nb = (N + 1) // 2, N // 2
    dev = metric.device
    i64 = dict(device=dev, dtype=torch.int64)
    unm = torch.empty(B, Na - r, **i64)
    src = torch.empty(B, r, **i64)
    dst = torch.empty(B, r, **i64)
    dest = torch.empty(B, N, **i64)
    slot_src = torch.empty(B, N, **i64)
    slot_start = torch.empty(B, N - r + 1, **i64)
    if B == 0:
        return unm, src, dst, dest, slot_src, slot_start
    f64 = metric.dtype == torch.float64
    acc = tl.float64 if f64 else tl.float32
    unit = torch.empty(B, N, D, device=dev, dtype=torch.float64 if f64 else torch.float32)
    node_max = torch.empty(B, Na, device=dev, dtype=unit.dtype)
    node_idx = torch.empty(B, Na, device=dev, dtype=torch.int32)
    rank = torch.empty(B, Na, device=dev, dtype=torch.int32)
    big = 2 if _interpreting() else 1
    _tome_normalize_kernel[(B, triton.cdiv(N, 32 * big))](
        metric, unit, N, D, metric.stride(0), metric.stride(1), metric.stride(2),
        ACC_DTYPE=acc, IS_F64=f64, BLOCK_T=32 * big,
        BLOCK_D=max(16, min(64, triton.next_power_of_2(D))), num_warps=4,
    )
    if f64:  # the multiply-sum path holds a (BLOCK_A, BLOCK_D, BLOCK_B) tile
        blocks = dict(BLOCK_A=16 * big, BLOCK_B=16 * big, BLOCK_D=16)
    else:
        # (the interpreter: whole rows of up to 64 channels, fewer Python-level steps)
        block_d = max(16, min(64, triton.next_power_of_2(D))) if big > 1 else SCORES_BLOCK_D
        blocks = dict(BLOCK_A=32 * big, BLOCK_B=64 * big, BLOCK_D=block_d)
    # two stages: with Triton's default three, ptxas spilled 8 B per thread at sm_90 where N
    # is not a multiple of 16 (tools/triton_aot_check.py); one, two and four stages do not
    _tome_scores_kernel[(B, triton.cdiv(Na, blocks["BLOCK_A"]))](
        unit, node_max, node_idx, N, Na, Nb, D,
        CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token, USE_DOT=not f64,
        ACC_DTYPE=acc, **blocks, num_warps=4, num_stages=2,
    )
    _tome_rank_kernel[(B, triton.cdiv(Na, 32 * big))](
        node_max, rank, Na, BLOCK_I=32 * big, BLOCK_K=64 * big, num_warps=4,
    )
    _tome_plan_kernel[(B, triton.cdiv(Na, 32 * big))](
        rank, node_idx, unm, src, dst, dest, slot_src, slot_start, N, Na, Nb, r,
        CLASS_TOKEN=class_token, DISTILL_TOKEN=distill_token, BLOCK_T=32 * big,
        BLOCK_K=64 * big, num_warps=4,
    )
    return unm, src, dst, dest, slot_src, slot_start
