"""Triton flash attention backward (``xray_ops.flash_attention``): FlashAttention-2 style,
deterministic (no atomics).

Three launches, with P recomputed from the forward's lse instead of stored:
1. preprocess: delta_i = rowsum(dO_i ⊙ O_i) − dlse_i (the lse gradient folds into delta, as
   dlse_i · P_ij joins dS_ij), plus, on row 0, (1/H) Σ_j P_0j · dcls_j (the CLS row's share).
2. dK/dV: a program owns BLOCK_N keys of one (b, h) and walks the queries;
   dV = Pᵀ dO, dK = scale · dSᵀ Q, and the per-head key-bias gradient Σ_i dS_ij.
3. dQ: a program owns BLOCK_M queries and walks the keys; dQ = scale · dS K.
with dP = dO Vᵀ (+ dcls/H on row 0: cls_attn is the head mean of P's row 0) and
dS = P ⊙ (dP − delta). dkey_bias = Σ over heads of step 2's partial sums, summed by PyTorch
in a fixed order, so the result is deterministic.

Gradients arriving may be expanded (stride 0) and inputs any strides; dq/dk/dv are written
into caller-provided tensors of any strides (the packed (B, N, 3, H, D) gradient included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_attention import (INTERPRETING, LOG2E, Tile, TilePolicy, _dot2, _head_ptr,
                              _load_lse, _load_rows, _program_block, _row0_log2_probs,
                              _seq_start_len, _seq_window, _store_rows, _varlen_args,
                              bhn_strides, bhnd_strides, bn_strides, head_dim_blocks,
                              input_precision, launch, length_bucket)


def _dkdv_smem(m, n, stages, d):
    return d * (2 * n + stages * 2 * m)  # K and V, then Q and dO per pipeline stage


def _dq_smem(m, n, stages, d):
    return d * (2 * m + stages * 2 * n)  # Q and dO, then K and V per pipeline stage


# (BLOCK_M, BLOCK_N, warps, stages, largest head dim without spills); see flash_attention.py.
# dK/dV keeps two (BLOCK_N, D) fp32 accumulators and K, V in registers: above D = 128 only the
# small 8-warp tiles (SMALL_TILES) fit.
DKDV = TilePolicy(
    "flash attention backward dK/dV",
    # (the full AOT table: (64, 64, 4, 2) spilled 24 B at D = 96 in bf16 with bias+cls, and
    # (64, 128, 8, 2) 8-16 B at D = 128: each now stops one head dim lower)
    {"fp16": (Tile(32, 64, 4, 3, 128), Tile(64, 64, 4, 2, 80), Tile(64, 128, 8, 2, 96)),
     "tf32": (Tile(32, 64, 4, 2, 80), Tile(16, 64, 4, 2, 128), Tile(32, 128, 8, 2, 128)),
     "ieee": (Tile(32, 16, 8, 2), Tile(16, 32, 8, 2), Tile(16, 16, 8, 1))},
    _dkdv_smem, (64, 32, 4, 1))
DQ = TilePolicy(
    "flash attention backward dQ",
    {"fp16": (Tile(64, 32, 4, 3), Tile(64, 64, 4, 2, 128), Tile(128, 64, 8, 2, 192),
              Tile(64, 64, 8, 2)),
     "tf32": (Tile(64, 32, 4, 2, 96), Tile(64, 64, 8, 2, 128)),
     "ieee": (Tile(32, 16, 8, 2), Tile(16, 32, 8, 2, 128))},
    _dq_smem, (32, 64, 4, 1))
DKDV_CONFIGS = DKDV.configs()
DQ_CONFIGS = DQ.configs()


def dkdv_heuristic(q, n_q: int, n_k: int, d: int, precision: str) -> triton.Config:
    preferred = (32, 64, 4, 3) if length_bucket(n_k) <= 256 else (64, 64, 4, 2)
    return DKDV.pick(q, precision, d, n_q, n_k, preferred)


def dq_heuristic(q, n_q: int, n_k: int, d: int, precision: str) -> triton.Config:
    preferred = (64, 32, 4, 3) if length_bucket(n_q) <= 256 else (64, 64, 4, 2)
    return DQ.pick(q, precision, d, n_q, n_k, preferred)


BWD_KEY = ["N_Q_BUCKET", "N_K_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "HAS_CLS", "VARLEN",
           "INPUT_PRECISION"]
PRE_BLOCK_M = 32 if INTERPRETING else 64
PRE_BLOCK_N = 32 if INTERPRETING else 64


@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr,  # forward output, shape (B, H, Nq, D) [varlen (Tq, H, D)]
    DO_ptr,  # its gradient, same shape, any strides (may be expanded)
    DLSE_ptr,  # gradient of lse, shape (B, H, Nq) [varlen (H, Tq)] (read iff HAS_DLSE)
    DELTA_ptr,  # out: delta, float32, laid out like lse
    Q_ptr,  # queries (row 0 of each sample is read iff HAS_CLS)
    K_ptr,  # keys (read iff HAS_CLS)
    BIAS_ptr,  # key_bias (read iff HAS_CLS and HAS_BIAS)
    LSE_ptr,  # forward lse, shape like DELTA (read iff HAS_CLS)
    DC_ptr,  # gradient of cls_attn, shape (B, Nk) [varlen (Tk,)] (read iff HAS_CLS)
    CU_Q_ptr,
    CU_K_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_xb, stride_xh, stride_xm,  # dlse
    stride_lb, stride_lh, stride_lm,  # lse and delta
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ab, stride_an,
    stride_cb, stride_cn,
    H,
    N_Q,
    N_K,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    HAS_CLS: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, h, start_m = _program_block(N_Q, H, BLOCK_M)
    q_start, len_q = _seq_start_len(CU_Q_ptr, b, N_Q, VARLEN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < len_q
    o0, o1 = _load_rows(_head_ptr(O_ptr, b, h, q_start, stride_ob, stride_oh, stride_om), offs_m,
                        m_mask, stride_om, stride_od, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    g0, g1 = _load_rows(_head_ptr(DO_ptr, b, h, q_start, stride_gb, stride_gh, stride_gm), offs_m,
                        m_mask, stride_gm, stride_gd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    delta = tl.sum(o0.to(tl.float32) * g0.to(tl.float32), 1)
    if BLOCK_D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * g1.to(tl.float32), 1)
    if HAS_DLSE:
        # dS_ij gains dlse_i · P_ij: the same as lowering delta_i by dlse_i
        dlse = tl.load(DLSE_ptr + b * stride_xb + h * stride_xh + (q_start + offs_m) * stride_xm,
                       mask=m_mask, other=0.0).to(tl.float32)
        delta -= dlse
    if HAS_CLS:
        # row 0's dP gains dcls/H, so its delta gains (1/H) Σ_j P_0j dcls_j; only the first
        # query block of a sample walks the keys (the others get an empty loop)
        k_start, len_k = _seq_start_len(CU_K_ptr, b, N_K, VARLEN)
        lse0 = tl.load(LSE_ptr + b * stride_lb + h * stride_lh + q_start * stride_lm)
        hi = tl.where((start_m == 0) & (len_q > 0), len_k, 0)
        extra = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            p0 = _row0_log2_probs(
                _head_ptr(Q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm), stride_qd,
                _head_ptr(K_ptr, b, h, k_start, stride_kb, stride_kh, stride_kn), stride_kn,
                stride_kd,
                BIAS_ptr + b * stride_ab + k_start * stride_an, stride_an,
                lse0, offs_n, len_k, qk_scale,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, CAUSAL, HAS_BIAS)
            dc = tl.load(DC_ptr + b * stride_cb + (k_start + offs_n) * stride_cn,
                         mask=offs_n < len_k, other=0.0).to(tl.float32)
            extra += p0 * dc
        delta = tl.where(offs_m == 0, delta + tl.sum(extra, 0) / H, delta)
    tl.store(DELTA_ptr + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_lm, delta,
             mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr,  # queries, shape (B, H, Nq, D) [varlen (Tq, H, D)], any strides
    K_ptr,  # keys, shape (B, H, Nk, D) [varlen (Tk, H, D)], any strides
    V_ptr,  # values, shape like K
    BIAS_ptr,  # key_bias, shape (B, Nk) [varlen (Tk,)] (read iff HAS_BIAS)
    DO_ptr,  # gradient of out, shape like Q, any strides (may be expanded)
    LSE_ptr,  # forward lse, shape (B, H, Nq) [varlen (H, Tq)], float32
    DELTA_ptr,  # delta from the preprocess, laid out like lse
    DC_ptr,  # gradient of cls_attn, shape (B, Nk) [varlen (Tk,)] (read iff HAS_CLS)
    DK_ptr,  # out: dk, shape like K, any strides
    DV_ptr,  # out: dv, shape like V, any strides
    DB_ptr,  # out: per-head key-bias gradient, shape (B, H, Nk) [varlen (H, Tk)], float32
    CU_Q_ptr,
    CU_K_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ab, stride_an,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_cn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dbb, stride_dbh, stride_dbn,
    H,
    N_Q,
    N_K,
    N_Q_BUCKET,  # length_bucket(N_Q), N_K_BUCKET: the autotuner's key, unused in the body
    N_K_BUCKET,
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, h, start_n = _program_block(N_K, H, BLOCK_N)
    q_start, len_q, k_start, len_k = _seq_window(CU_Q_ptr, CU_K_ptr, b, N_Q, N_K, VARLEN)
    q_base = _head_ptr(Q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm)
    g_base = _head_ptr(DO_ptr, b, h, q_start, stride_gb, stride_gh, stride_gm)
    row_off = b * stride_lb + h * stride_lh + q_start * stride_lm

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < len_k
    k0, k1 = _load_rows(_head_ptr(K_ptr, b, h, k_start, stride_kb, stride_kh, stride_kn), offs_n,
                        n_mask, stride_kn, stride_kd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    v0, v1 = _load_rows(_head_ptr(V_ptr, b, h, k_start, stride_vb, stride_vh, stride_vn), offs_n,
                        n_mask, stride_vn, stride_vd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS_ptr + b * stride_ab + (k_start + offs_n) * stride_an, mask=n_mask,
                       other=0.0).to(tl.float32) * 1.4426950408889634
        dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_CLS:
        # cls_attn is the head mean of P's row 0: every head's dP[0, j] gains dcls_j / H
        dc = tl.load(DC_ptr + b * stride_cb + (k_start + offs_n) * stride_cn, mask=n_mask,
                     other=0.0).to(tl.float32) / H

    lo = 0
    if CAUSAL:
        # key j is seen by queries j.. only: start at the query block holding this tile's first key
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = tl.where(start_n * BLOCK_N < len_k, len_q, 0)
    # the transposed orientation (keys x queries) keeps dK/dV's accumulators row-major
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < len_q
        qt0, qt1 = _load_rows(q_base, offs_m, m_mask, stride_qm, stride_qd, HEAD_DIM, BLOCK_D0,
                              BLOCK_D1, True)
        st = _dot2(k0, k1, qt0, qt1, BLOCK_D1, INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            st += bias[:, None]
        # P from the forward's lse (padded queries and fully masked rows: P = 0)
        lse = _load_lse(LSE_ptr + row_off, offs_m, m_mask, stride_lm)
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        valid = m_mask[None, :] & n_mask[:, None]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        pt = tl.where(valid, pt, 0.0)
        g0, g1 = _load_rows(g_base, offs_m, m_mask, stride_gm, stride_gd, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, False)
        dv0 += tl.dot(pt.to(g0.dtype), g0, input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            dv1 += tl.dot(pt.to(g1.dtype), g1, input_precision=INPUT_PRECISION)
        dpt = _dot2(v0, v1, tl.trans(g0), tl.trans(g1), BLOCK_D1, INPUT_PRECISION)
        if HAS_CLS:
            dpt += tl.where(offs_m[None, :] == 0, dc[:, None], 0.0)
        delta = tl.load(DELTA_ptr + row_off + offs_m * stride_lm, mask=m_mask, other=0.0)
        dst = pt * (dpt - delta[None, :])
        if HAS_BIAS:
            dbias += tl.sum(dst, 1)  # from the fp32 dS, before its cast for the dot
        dk0 += tl.dot(dst.to(qt0.dtype), tl.trans(qt0), input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            dk1 += tl.dot(dst.to(qt1.dtype), tl.trans(qt1), input_precision=INPUT_PRECISION)

    dk1_out = dk0
    dv1_out = dv0
    if BLOCK_D1 > 0:
        dk1_out = dk1 * scale
        dv1_out = dv1
    _store_rows(_head_ptr(DK_ptr, b, h, k_start, stride_dkb, stride_dkh, stride_dkn), offs_n,
                n_mask, stride_dkn, stride_dkd, dk0 * scale, dk1_out, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    _store_rows(_head_ptr(DV_ptr, b, h, k_start, stride_dvb, stride_dvh, stride_dvn), offs_n,
                n_mask, stride_dvn, stride_dvd, dv0, dv1_out, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    if HAS_BIAS:
        tl.store(DB_ptr + b * stride_dbb + h * stride_dbh + (k_start + offs_n) * stride_dbn,
                 dbias, mask=n_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr,  # queries, shape (B, H, Nq, D) [varlen (Tq, H, D)], any strides
    K_ptr,  # keys, shape (B, H, Nk, D) [varlen (Tk, H, D)], any strides
    V_ptr,  # values, shape like K
    BIAS_ptr,  # key_bias, shape (B, Nk) [varlen (Tk,)] (read iff HAS_BIAS)
    DO_ptr,  # gradient of out, shape like Q, any strides (may be expanded)
    LSE_ptr,  # forward lse, shape (B, H, Nq) [varlen (H, Tq)], float32
    DELTA_ptr,  # delta from the preprocess, laid out like lse
    DC_ptr,  # gradient of cls_attn, shape (B, Nk) [varlen (Tk,)] (read iff HAS_CLS)
    DQ_ptr,  # out: dq, shape like Q, any strides
    CU_Q_ptr,
    CU_K_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ab, stride_an,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_cb, stride_cn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H,
    N_Q,
    N_K,
    N_Q_BUCKET,  # length_bucket(N_Q), N_K_BUCKET: the autotuner's key, unused in the body
    N_K_BUCKET,
    scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLS: tl.constexpr,
    VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, h, start_m = _program_block(N_Q, H, BLOCK_M)
    q_start, len_q, k_start, len_k = _seq_window(CU_Q_ptr, CU_K_ptr, b, N_Q, N_K, VARLEN)
    k_base = _head_ptr(K_ptr, b, h, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _head_ptr(V_ptr, b, h, k_start, stride_vb, stride_vh, stride_vn)
    row_off = b * stride_lb + h * stride_lh + q_start * stride_lm

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < len_q
    q0, q1 = _load_rows(_head_ptr(Q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm), offs_m,
                        m_mask, stride_qm, stride_qd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    g0, g1 = _load_rows(_head_ptr(DO_ptr, b, h, q_start, stride_gb, stride_gh, stride_gm), offs_m,
                        m_mask, stride_gm, stride_gd, HEAD_DIM, BLOCK_D0, BLOCK_D1, False)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    lse = _load_lse(LSE_ptr + row_off, offs_m, m_mask, stride_lm) * 1.4426950408889634
    delta = tl.load(DELTA_ptr + row_off + offs_m * stride_lm, mask=m_mask, other=0.0)

    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
    hi = tl.where(start_m * BLOCK_M < len_q, hi, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < len_k
        kt0, kt1 = _load_rows(k_base, offs_n, n_mask, stride_kn, stride_kd, HEAD_DIM, BLOCK_D0,
                              BLOCK_D1, True)
        vt0, vt1 = _load_rows(v_base, offs_n, n_mask, stride_vn, stride_vd, HEAD_DIM, BLOCK_D0,
                              BLOCK_D1, True)
        s = _dot2(q0, q1, kt0, kt1, BLOCK_D1, INPUT_PRECISION) * qk_scale
        dp = _dot2(g0, g1, vt0, vt1, BLOCK_D1, INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS_ptr + b * stride_ab + (k_start + offs_n) * stride_an, mask=n_mask,
                           other=0.0).to(tl.float32)
            s += bias[None, :] * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        if HAS_CLS:
            dc = tl.load(DC_ptr + b * stride_cb + (k_start + offs_n) * stride_cn, mask=n_mask,
                         other=0.0).to(tl.float32) / H
            dp += tl.where(offs_m[:, None] == 0, dc[None, :], 0.0)
        ds = p * (dp - delta[:, None])
        dq0 += tl.dot(ds.to(kt0.dtype), tl.trans(kt0), input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            dq1 += tl.dot(ds.to(kt1.dtype), tl.trans(kt1), input_precision=INPUT_PRECISION)

    dq1_out = dq0
    if BLOCK_D1 > 0:
        dq1_out = dq1 * scale
    _store_rows(_head_ptr(DQ_ptr, b, h, q_start, stride_dqb, stride_dqh, stride_dqm), offs_m,
                m_mask, stride_dqm, stride_dqd, dq0 * scale, dq1_out, HEAD_DIM, BLOCK_D0, BLOCK_D1)


_attn_bwd_dkdv = triton.autotune(configs=DKDV_CONFIGS, key=BWD_KEY,
                                 prune_configs_by={"early_config_prune": DKDV.prune}
                                 )(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(configs=DQ_CONFIGS, key=BWD_KEY,
                               prune_configs_by={"early_config_prune": DQ.prune}
                               )(_attn_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
def flash_attention_backward(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale: float,
                             causal: bool, dq, dk, dv, *, cu_seqlens_q=None, cu_seqlens_k=None,
                             max_seqlen_q=None, max_seqlen_k=None,
                             dkdv_config: triton.Config | None = None,
                             dq_config: triton.Config | None = None):
    """Write dq, dk, dv (caller-allocated, any strides) and return dkey_bias (or None).

    dout like out; dcls like cls_attn or None; dlse like lse or None; out and lse from the
    forward. Shapes and layouts as :func:`flash_attention_forward` (dense or varlen).
    dkdv_config / dq_config force tile configs (tests); default: autotuned.
    """
    varlen, B, N_Q, N_K, cu_q, cu_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, k)
    D = q.shape[-1]
    H = q.shape[-2] if varlen else q.shape[1]
    has_bias = key_bias is not None
    has_cls = dcls is not None
    if B * H == 0 or q.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return torch.zeros_like(key_bias) if has_bias else None
    # forced tiles that cannot fit fail before any launch
    for policy, cfg in ((DKDV, dkdv_config), (DQ, dq_config)):
        if cfg is not None:
            policy.check_forced(cfg, q, D)
    # per-head key-bias gradients, summed over heads below (lse stands in when there is none)
    db_heads = lse
    if has_bias:
        db_heads = torch.empty((H, k.shape[0]) if varlen else (B, H, N_K), device=q.device,
                               dtype=torch.float32)
    d0, d1 = head_dim_blocks(D)
    qk_scale = scale * LOG2E
    delta = torch.empty_like(lse)
    bias = key_bias if has_bias else q
    dcls_t = dcls if has_cls else q
    common = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, CAUSAL=causal, HAS_BIAS=has_bias,
                  VARLEN=varlen)

    _attn_bwd_preprocess_kernel[(triton.cdiv(N_Q, PRE_BLOCK_M) * B * H,)](
        out, dout, dlse if dlse is not None else lse, delta, q, k, bias, lse, dcls_t, cu_q, cu_k,
        *bhnd_strides(out, varlen), *bhnd_strides(dout, varlen),
        *(bhn_strides(dlse, varlen) if dlse is not None else (0, 0, 0)),
        *bhn_strides(lse, varlen), *bhnd_strides(q, varlen), *bhnd_strides(k, varlen),
        *bn_strides(key_bias, varlen), *bn_strides(dcls, varlen),
        H, N_Q, N_K, qk_scale, HAS_DLSE=dlse is not None, HAS_CLS=has_cls,
        BLOCK_M=PRE_BLOCK_M, BLOCK_N=PRE_BLOCK_N, num_warps=4, **common,
    )
    shared = (*bhnd_strides(q, varlen), *bhnd_strides(k, varlen), *bhnd_strides(v, varlen),
              *bn_strides(key_bias, varlen), *bhnd_strides(dout, varlen),
              *bhn_strides(lse, varlen), *bn_strides(dcls, varlen))
    prec = input_precision(q.dtype)
    buckets = (length_bucket(N_Q), length_bucket(N_K))

    def grid_n(meta):
        return (triton.cdiv(N_K, meta["BLOCK_N"]) * B * H,)

    kwargs = dict(HAS_CLS=has_cls, INPUT_PRECISION=prec, **common)
    launch(_attn_bwd_dkdv, _attn_bwd_dkdv_kernel, grid_n,
           (q, k, v, bias, dout, lse, delta, dcls_t, dk, dv, db_heads, cu_q, cu_k,
            *shared, *bhnd_strides(dk, varlen), *bhnd_strides(dv, varlen),
            *bhn_strides(db_heads, varlen), H, N_Q, N_K, *buckets, scale, qk_scale),
           kwargs, dkdv_config, dkdv_heuristic(q, N_Q, N_K, D, prec), DKDV, q)

    def grid_m(meta):
        return (triton.cdiv(N_Q, meta["BLOCK_M"]) * B * H,)

    launch(_attn_bwd_dq, _attn_bwd_dq_kernel, grid_m,
           (q, k, v, bias, dout, lse, delta, dcls_t, dq, cu_q, cu_k,
            *shared, *bhnd_strides(dq, varlen), H, N_Q, N_K, *buckets, scale, qk_scale),
           kwargs, dq_config, dq_heuristic(q, N_Q, N_K, D, prec), DQ, q)
    if not has_bias:
        return None
    # Σ over heads in a fixed order: deterministic
    return db_heads.sum(0 if varlen else 1).to(key_bias.dtype)
