"""The cpu backend of ``contrastive_loss``: PyTorch's own GEMMs on row tiles of the logits, with
an online log-sum-exp — O(tile · B) extra memory, never the (B, B) logits.

A tile is ``rows`` × B logits (rows = max(16, TILE_ELEMENTS // B)): about 4 MB at B = 4096, then
16 rows × B. Per tile, forward: one GEMM, the rows' log-sum-exp and softmax-weighted dot, and —
in the full form, where the text direction's rows are this matrix's columns — a running
(max, sum, weighted sum) per column, rescaled when a column's max grows: one GEMM in all where
open_clip's ClipLoss makes two. Backward per tile: the GEMM again, P = the row softmax + the
column softmax (from the forward's log-sum-exps), then dI_rows = P·T and dT += Pᵀ·I_rows:
three GEMMs where ClipLoss makes four after its forward two.

The local-loss form's two directions are two independent row-softmax passes of the same kind.
"""

from __future__ import annotations

import torch

from ..reference.bias_gelu import compute_dtype

# elements of a logits tile (4 MB in float32)
TILE_ELEMENTS = 1 << 20
MIN_TILE_ROWS = 16


def _tile_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, max(MIN_TILE_ROWS, TILE_ELEMENTS // max(1, n_cols))))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row, without an (rows, cols) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _row_stats(rows, cols, sc):
    """(lse, ed) of each row of sc · rows colsᵀ, tile by tile."""
    n = rows.shape[0]
    lse = rows.new_empty(n)
    ed = rows.new_empty(n)
    tb = _tile_rows(n, cols.shape[0])
    for r0 in range(0, n, tb):
        d = rows[r0:r0 + tb] @ cols.T
        s = d * sc
        m = s.amax(1, keepdim=True)
        e = s.sub_(m).exp_()
        l = e.sum(1)
        lse[r0:r0 + tb] = m.reshape(-1) + l.log()
        ed[r0:r0 + tb] = _rowdot(e, d) / l
    return lse, ed


def _full_stats(img, txt, sc):
    """Both directions of the full form in one pass over row tiles of sc · I Tᵀ: the rows'
    statistics directly, the columns' online."""
    n = img.shape[0]
    lse_i, ed_i = img.new_empty(n), img.new_empty(n)
    col_m = img.new_full((n,), float("-inf"))
    col_l = img.new_zeros(n)
    col_e = img.new_zeros(n)
    tb = _tile_rows(n, n)
    for r0 in range(0, n, tb):
        d = img[r0:r0 + tb] @ txt.T
        s = d * sc
        m = s.amax(1, keepdim=True)
        e = torch.exp(s - m)
        l = e.sum(1)
        lse_i[r0:r0 + tb] = m.reshape(-1) + l.log()
        ed_i[r0:r0 + tb] = _rowdot(e, d) / l
        # columns: rescale the running sums when a column's max grows
        new_m = torch.maximum(col_m, s.amax(0))
        alpha = torch.exp(col_m - new_m)
        e = s.sub_(new_m).exp_()
        col_l = col_l * alpha + e.sum(0)
        col_e = col_e * alpha + e.mul_(d).sum(0)
        col_m = new_m
    return lse_i, col_m + col_l.log(), ed_i, col_e / col_l


def contrastive_stats(img, txt, img_all, txt_all, scale):
    """The forward of the cpu backend: (lse_i, lse_t, ed_i, ed_t), see xray_ops.ops.contrastive."""
    ct = compute_dtype(img.dtype)
    sc = scale.to(ct).reshape(())
    i, t = img.to(ct), txt.to(ct)
    if img_all is None:
        return _full_stats(i, t, sc)
    lse_i, ed_i = _row_stats(i, txt_all.to(ct), sc)
    lse_t, ed_t = _row_stats(t, img_all.to(ct), sc)
    return lse_i, lse_t, ed_i, ed_t


def _row_grads(rows, cols, sc, k, lse_rows, lse_cols, d_cols):
    """k · Σ_j P_rj cols_j per row (returned) and k · Σ_r P_rj rows_r added into d_cols, with
    P = exp(s − lse_rows) (+ exp(s − lse_cols) when given), tile by tile."""
    n = rows.shape[0]
    d_rows = rows.new_empty(rows.shape)
    tb = _tile_rows(n, cols.shape[0])
    for r0 in range(0, n, tb):
        blk = rows[r0:r0 + tb]
        s = (blk @ cols.T).mul_(sc)
        p = torch.exp(s - lse_rows[r0:r0 + tb, None])
        if lse_cols is not None:
            p += s.sub_(lse_cols[None, :]).exp_()
        torch.mm(p, cols, out=d_rows[r0:r0 + tb]).mul_(k)
        d_cols.addmm_(p.T, blk, alpha=k)
    return d_rows


def contrastive_grads(coef, img, txt, img_all, txt_all, scale, lse_i, lse_t):
    """The backward of the cpu backend: the dense gradient terms (see xray_ops.ops.contrastive)."""
    ct = compute_dtype(img.dtype)
    sc = scale.to(ct).reshape(())
    k = float(coef) * float(sc)
    i, t = img.to(ct), txt.to(ct)
    if img_all is None:
        d_t = torch.zeros_like(t)
        d_i = _row_grads(i, t, sc, k, lse_i, lse_t, d_t)
        return d_i, d_t, i.new_empty(0), i.new_empty(0)
    ia, ta = img_all.to(ct), txt_all.to(ct)
    d_ta, d_ia = torch.zeros_like(ta), torch.zeros_like(ia)
    d_i = _row_grads(i, ta, sc, k, lse_i, None, d_ta)
    d_t = _row_grads(t, ia, sc, k, lse_t, None, d_ia)
    return d_i, d_t, d_ia, d_ta
