"""numba kernels for ``layer_norm`` with a fused residual add and LayerScale on the CPU (float32).

Rows in parallel (:mod:`xray_ops.cpu._parallel`), each row in L1 while it is worked on:

  forward:  s = residual + gamma·x (stored), mean and variance (float64 sums), y — reading x and
            residual once and writing s and y once (eager: g·x, the add and the LayerNorm each
            go through memory);
  backward: the two row sums, then ds (+ the incoming grad of s), dx = ds·gamma, and this
            chunk's partial column sums of d weight, d bias and d gamma in a (chunks, C) float32
            buffer, summed in a fixed order at the end (deterministic).

Optional inputs are dummies plus flags tested once per row, so the inner loops have no
branches and vectorize.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import _parallel


@numba.njit(inline="always", fastmath={"reassoc"})
def _mean_rstd(v, C, eps):
    # float64 sums; reassoc lets LLVM vectorize them (a fixed order per build: deterministic)
    mean = 0.0
    for j in range(C):
        mean += v[j]
    mean /= C
    var = 0.0
    for j in range(C):
        d = v[j] - mean
        var += d * d
    return mean, 1.0 / np.sqrt(var / C + eps)


# reassoc here too: _mean_rstd is inlined, and without the flag on the caller its float64 sums
# stayed one serial chain of adds per row (the forward ran at ~0.5 G elements/s on a core)
@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _fwd_rows(x, r, g, w, b, eps, has_r, has_g, y, s, mean_out, rstd_out, lo, hi, chunk):
    C = x.shape[1]
    row = np.empty(C, dtype=np.float32)
    for i in range(lo, hi):
        if has_r and has_g:
            for j in range(C):
                v = r[i, j] + g[j] * x[i, j]
                row[j] = v
                s[i, j] = v
        elif has_r:
            for j in range(C):
                v = r[i, j] + x[i, j]
                row[j] = v
                s[i, j] = v
        else:
            for j in range(C):
                row[j] = x[i, j]
        mean, rstd = _mean_rstd(row, C, eps)
        m32, r32 = np.float32(mean), np.float32(rstd)
        for j in range(C):
            y[i, j] = (row[j] - m32) * r32 * w[j] + b[j]
        mean_out[i] = m32
        rstd_out[i] = r32


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def _bwd_rows(gy, gs, s, branch, g, w, mean, rstd, has_gs, has_g, ds, dx, dw, db, dg,
              lo, hi, chunk):
    C = s.shape[1]
    inv_c = np.float32(1.0 / C)
    dw_acc, db_acc, dg_acc = dw[chunk], db[chunk], dg[chunk]
    xhat = np.empty(C, dtype=np.float32)
    for i in range(lo, hi):
        m, rs = mean[i], rstd[i]
        c1 = np.float32(0.0)
        c2 = np.float32(0.0)
        # two loops, not one: with six arrays in one loop LLVM's alias checks outgrew its
        # limit and the loop stayed scalar
        for j in range(C):
            xh = (s[i, j] - m) * rs
            xhat[j] = xh
            gh = gy[i, j] * w[j]
            c1 += gh * xh
            c2 += gh
        for j in range(C):
            dw_acc[j] += gy[i, j] * xhat[j]
            db_acc[j] += gy[i, j]
        c1 *= inv_c
        c2 *= inv_c
        if has_gs:
            for j in range(C):
                ds[i, j] = rs * (gy[i, j] * w[j] - c2 - xhat[j] * c1) + gs[i, j]
        else:
            for j in range(C):
                ds[i, j] = rs * (gy[i, j] * w[j] - c2 - xhat[j] * c1)
        if has_g:
            for j in range(C):
                d = ds[i, j]
                dx[i, j] = d * g[j]
                dg_acc[j] += d * branch[i, j]


def _vec(t, C: int, fill: float) -> np.ndarray:
    if t is None:
        return np.full(C, fill, dtype=np.float32)
    # a copy (C floats), never a view: Tensor.numpy() marks the storage non-resizable for good,
    # and FSDP2 frees an unsharded parameter by resizing its storage to 0 after each forward
    return t.detach().to(torch.float32, copy=True).contiguous().numpy()


def _np(t: torch.Tensor | None, like: torch.Tensor) -> np.ndarray:
    # a strided (even stride-0) numpy view of the same memory, or a dummy
    return (t if t is not None else like).detach().numpy()


def layer_norm_forward(x, weight, bias, eps, residual, residual_scale):
    """x (M, C) float32 -> (y, s or empty, mean (M,), rstd (M,)); see xray_ops.ops.layer_norm."""
    M, C = x.shape
    y = torch.empty(M, C, dtype=torch.float32)
    has_r = residual is not None
    s = torch.empty(M, C, dtype=torch.float32) if has_r else x.new_empty(0)
    mean = torch.empty(M, dtype=torch.float32)
    rstd = torch.empty(M, dtype=torch.float32)
    if M:
        _parallel.run(_fwd_rows, M, 4 * C, x.detach().numpy(), _np(residual, x),
                      _vec(residual_scale, C, 1.0), _vec(weight, C, 1.0), _vec(bias, C, 0.0),
                      float(eps), has_r, residual_scale is not None, y.numpy(),
                      (s if has_r else y).numpy(), mean.numpy(), rstd.numpy())
    return y, s, mean, rstd


def layer_norm_backward(grad_y, grad_s, x, branch, weight, bias, residual_scale, mean, rstd):
    """Gradients of :func:`layer_norm_forward` (inputs as xray_ops.ops.layer_norm_backends)."""
    M, C = x.shape
    has_g = residual_scale is not None
    ds = torch.empty(M, C, dtype=torch.float32)
    dx = torch.empty(M, C, dtype=torch.float32) if has_g else x.new_empty(0)
    n = _parallel.chunks(M, 6 * C)
    dw, db, dg = (torch.zeros(n, C, dtype=torch.float32) for _ in range(3))
    if M:
        _parallel.run(_bwd_rows, M, 6 * C, grad_y.detach().numpy(), _np(grad_s, grad_y),
                      x.detach().numpy(), _np(branch, x), _vec(residual_scale, C, 1.0),
                      _vec(weight, C, 1.0), mean.numpy(), rstd.numpy(), grad_s is not None,
                      has_g, ds.numpy(), (dx if has_g else ds).numpy(), dw.numpy(), db.numpy(),
                      dg.numpy())

    def total(part, p):
        return part.sum(0).to(p.dtype) if p is not None else x.new_empty(0)

    return ds, dx, total(dw, weight), total(db, bias), total(dg, residual_scale)
