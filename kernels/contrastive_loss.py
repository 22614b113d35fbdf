"""Triton kernels for ``contrastive_loss``: the (rows × columns) logits are computed tile by tile
and never stored, in the forward or the backward (as flash attention treats its scores).

Forward (:func:`row_stats`), per row r of scale · R Kᵀ: lse_r = log Σ_j exp(s_rj) and
ed_r = Σ_j softmax(s_r)_j · d_rj (d = raw dot products, for d loss / d logit_scale), with an
online log-sum-exp over column tiles (base 2: exp2 of logits pre-multiplied by log2 e). The full
form's two directions are two calls: rows I against columns T, then rows T against columns I.
When the row blocks alone cannot fill the GPU, the columns are split over several programs
whose partial (lse, ed) the launcher merges, O(splits · B) floats.

Backward (:func:`row_grads`), for the rows R: dR = k · Σ_j P_rj K_j with
P_rj = [ROW_TERM] exp(s_rj − lse_r) + [COL_TERM] exp(s_rj − lse'_j) — the softmax of the
row's own direction and/or the column softmax of the other direction (the full form's
logits_per_text is the transpose). The logits of a tile are recomputed, P formed in registers
(cast to the embeddings' dtype for the second dot, as flash attention casts P), and P · K_tile
added into a float32 accumulator of the program's rows: in registers when C fits one K block,
else in a (splits, B, C) float32 buffer the program alone owns (no atomics, deterministic).
Each gradient is one call: the full form's dI is row_grads(I, T, lse_i, lse_t) and dT is
row_grads(T, I, lse_t, lse_i).

Tiles are fixed heuristics (not autotuned: the backward accumulates in place, so a tuning
rerun would double it), not yet tuned on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import sm_count

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# at most this many column splits (each holds a (B, C) float32 accumulator in the backward)
MAX_SPLITS = 8


def input_precision(dtype: torch.dtype) -> str:
    # fp32 embeddings: IEEE fp32 dots (no TF32), as the house's fp32 attention
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(C: int, dtype: torch.dtype, grads: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the stats (or grads) kernel.

    fp16 / bf16: 64 x 64 tiles on tensor cores, 8 warps (the grads kernel holds P and an
    accumulator tile besides the logits). fp32 (IEEE dots, on FMA units): 32 x 32 tiles.
    C <= 64 keeps the gradient accumulator in registers (one K block). No spills at sm_90
    (tools/aot_table.py)."""
    if INTERPRETING:
        return 16, 16, max(16, min(256, triton.next_power_of_2(C))), 4, 1
    if dtype == torch.float32:
        return 32, 32, 32 if C > 32 else max(16, triton.next_power_of_2(C)), 4, 2
    bk = 64 if C > 64 else max(16, triton.next_power_of_2(C))
    return 64, 64, bk, 8, 3


@triton.jit
def _dots(R_ptr, K_ptr, rows, cols, mask_m, mask_n, C, stride_rm, stride_rk, stride_km,
          stride_kk, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """Raw dot products of BLOCK_M rows with BLOCK_N columns, float32 (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + ks
        mask_k = kk < C
        a = tl.load(R_ptr + rows[:, None] * stride_rm + kk[None, :] * stride_rk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(K_ptr + kk[:, None] * stride_kk + cols[None, :] * stride_km,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_stats_kernel(
    R_ptr,  # rows, shape (NR, C), any strides
    K_ptr,  # columns, shape (NC, C), any strides, R's dtype
    SCALE_ptr,  # logit scale, one element, any float dtype
    LSE_ptr,  # float32 (n_splits, NR): natural log-sum-exp over the split's columns
    ED_ptr,  # float32 (n_splits, NR): softmax-weighted mean of the raw dots over the split
    NR,
    NC,
    C,
    cols_per_split,  # a multiple of BLOCK_N
    stride_rm,
    stride_rk,
    stride_km,
    stride_kk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < NR
    qscale = tl.load(SCALE_ptr).to(tl.float32) * 1.4426950408889634  # logits in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(NC, n_lo + cols_per_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = cols < n_hi
        d = _dots(R_ptr, K_ptr, rows, cols, mask_m, mask_n, C, stride_rm, stride_rk, stride_km,
                  stride_kk, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        s = tl.where(mask_n[None, :], d * qscale, float("-inf"))
        # rescale the running sums when the row max grows
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        e_i = e_i * alpha + tl.sum(p * d, axis=1)
        m_i = m_new
    out = pid_s * NR + rows
    tl.store(LSE_ptr + out, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)
    tl.store(ED_ptr + out, e_i / l_i, mask=mask_m)


@triton.jit
def _row_grads_kernel(
    R_ptr,  # rows, shape (NR, C), any strides
    K_ptr,  # columns, shape (NC, C), any strides, R's dtype
    SCALE_ptr,  # logit scale, one element
    LSE_R_ptr,  # float32 (NR,): lse of each row's softmax; unused without ROW_TERM
    LSE_C_ptr,  # float32 (NC,): lse of each column's softmax; unused without COL_TERM
    DR_ptr,  # float32 (n_splits, NR, C), contiguous, zeros: Σ_j P_rj K_j over the split
    NR,
    NC,
    C,
    cols_per_split,  # a multiple of BLOCK_N
    stride_rm,
    stride_rk,
    stride_km,
    stride_kk,
    ROW_TERM: tl.constexpr,
    COL_TERM: tl.constexpr,
    ONE_K_BLOCK: tl.constexpr,  # C <= BLOCK_K: the accumulator stays in registers
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < NR
    qscale = tl.load(SCALE_ptr).to(tl.float32) * 1.4426950408889634
    lse_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_TERM:
        lse_r = tl.load(LSE_R_ptr + rows, mask=mask_m, other=0.0) * 1.4426950408889634
    ks = tl.arange(0, BLOCK_K)
    dr_rows = DR_ptr + pid_s.to(tl.int64) * NR * C + rows[:, None] * C
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(NC, n_lo + cols_per_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = cols < n_hi
        s = _dots(R_ptr, K_ptr, rows, cols, mask_m, mask_n, C, stride_rm, stride_rk, stride_km,
                  stride_kk, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K) * qscale
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW_TERM:
            p += tl.exp2(s - lse_r[:, None])
        if COL_TERM:
            lse_c = tl.load(LSE_C_ptr + cols, mask=mask_n, other=0.0) * 1.4426950408889634
            p += tl.exp2(s - lse_c[None, :])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        # P in the embeddings' dtype for the second dot (as flash attention casts P)
        p = p.to(K_ptr.dtype.element_ty)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + ks
            mask_k = kk < C
            kt = tl.load(K_ptr + cols[:, None] * stride_km + kk[None, :] * stride_kk,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if ONE_K_BLOCK:
                acc = tl.dot(p, kt, acc, input_precision=PRECISION)
            else:
                mask = mask_m[:, None] & mask_k[None, :]
                old = tl.load(dr_rows + kk[None, :], mask=mask, other=0.0)
                tl.store(dr_rows + kk[None, :],
                         tl.dot(p, kt, old, input_precision=PRECISION), mask=mask)
    if ONE_K_BLOCK:
        tl.store(dr_rows + ks[None, :], acc, mask=mask_m[:, None] & (ks < C)[None, :])


def _splits(NR: int, NC: int, bm: int, bn: int, device) -> tuple[int, int]:
    """(n_splits, cols_per_split): enough programs to fill the GPU when the rows alone do not."""
    n_row_blocks = triton.cdiv(NR, bm)
    n_col_blocks = triton.cdiv(NC, bn)
    if INTERPRETING:
        want = 2  # exercise the merge in the tests
    else:
        want = triton.cdiv(2 * sm_count(device), n_row_blocks)
    want = max(1, min(want, MAX_SPLITS, n_col_blocks))
    per = triton.cdiv(n_col_blocks, want) * bn
    return triton.cdiv(NC, per), per


def row_stats(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor):
    """rows (NR, C), cols (NC, C) (any strides, same float16 / bfloat16 / float32 dtype), scale
    (one element) -> (lse (NR,), ed (NR,)) float32 of the logits scale · rows colsᵀ."""
    NR, C = rows.shape
    NC = cols.shape[0]
    bm, bn, bk, warps, stages = _config(C, rows.dtype)
    n_splits, per = _splits(NR, NC, bm, bn, rows.device)
    lse = torch.empty(n_splits, NR, device=rows.device, dtype=torch.float32)
    ed = torch.empty_like(lse)
    _row_stats_kernel[(triton.cdiv(NR, bm), n_splits)](
        rows, cols, scale, lse, ed, NR, NC, C, per, rows.stride(0), rows.stride(1),
        cols.stride(0), cols.stride(1), PRECISION=input_precision(rows.dtype), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    if n_splits == 1:
        return lse[0], ed[0]
    # merge the splits: lse = logsumexp of the parts, ed = their weighted mean
    total = torch.logsumexp(lse, 0)
    return total, (torch.exp(lse - total) * ed).sum(0)


def row_grads(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor,
              lse_rows: torch.Tensor | None, lse_cols: torch.Tensor | None) -> torch.Tensor:
    """Σ_j P_rj · cols_j (NR, C) float32, P_rj = exp(s_rj − lse_rows_r) (when lse_rows is
    given) + exp(s_rj − lse_cols_j) (when lse_cols is given), s = scale · rows colsᵀ."""
    NR, C = rows.shape
    NC = cols.shape[0]
    bm, bn, bk, warps, stages = _config(C, rows.dtype, grads=True)
    n_splits, per = _splits(NR, NC, bm, bn, rows.device)
    dr = torch.zeros(n_splits, NR, C, device=rows.device, dtype=torch.float32)
    f32 = dr  # placeholder pointer for an absent lse
    _row_grads_kernel[(triton.cdiv(NR, bm), n_splits)](
        rows, cols, scale, lse_rows if lse_rows is not None else f32,
        lse_cols if lse_cols is not None else f32, dr, NR, NC, C, per, rows.stride(0),
        rows.stride(1), cols.stride(0), cols.stride(1), ROW_TERM=lse_rows is not None,
        COL_TERM=lse_cols is not None, ONE_K_BLOCK=C <= bk,
        PRECISION=input_precision(rows.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return dr[0] if n_splits == 1 else dr.sum(0)


# ----------------------------------------------------------------------------------------------
# the op's dispatched forward and backward (xray_ops.ops.contrastive) on the two launchers
# ----------------------------------------------------------------------------------------------
def contrastive_stats(img, txt, img_all, txt_all, scale):
    """(lse_i, lse_t, ed_i, ed_t): the image direction's rows against the text columns (all of
    them in the local form), then the text direction's."""
    cols_t, cols_i = (txt, img) if img_all is None else (txt_all, img_all)
    lse_i, ed_i = row_stats(img, cols_t, scale)
    lse_t, ed_t = row_stats(txt, cols_i, scale)
    return lse_i, lse_t, ed_i, ed_t


def contrastive_grads(coef, img, txt, img_all, txt_all, scale, lse_i, lse_t):
    """The dense gradient terms (dI, dT, dI_all or empty, dT_all or empty), float32."""
    k = (coef * scale.to(coef.dtype)).reshape(())
    if img_all is None:  # both softmaxes of the one matrix reach both embeddings
        return (row_grads(img, txt, scale, lse_i, lse_t) * k,
                row_grads(txt, img, scale, lse_t, lse_i) * k, img.new_empty(0),
                img.new_empty(0))
    return (row_grads(img, txt_all, scale, lse_i, None) * k,
            row_grads(txt, img_all, scale, lse_t, None) * k,
            row_grads(img_all, txt, scale, None, lse_t) * k,
            row_grads(txt_all, img, scale, None, lse_i) * k)
