"""numba kernels for EViT token reorganization on the CPU, forward and backward.

Parallel over the batch; each row is ranked once (a stable descending argsort, NaN first),
then the kept tokens are copied and the dropped ones folded into the fused token in the same
pass over the row. Accumulation in float64.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..reference.evit import appends_fused_token


@numba.njit(cache=True, nogil=True)
def _descending_order(a):
    """Indices of `a` by descending value, ties by lower index, NaN first (= torch's stable sort)."""
    n = a.shape[0]
    order = np.empty(n, dtype=np.int64)
    n_nan = 0
    for j in range(n):
        if np.isnan(a[j]):
            order[n_nan] = j
            n_nan += 1
    if n_nan == n:
        return order
    rest = np.empty(n - n_nan, dtype=np.int64)
    neg = np.empty(n - n_nan, dtype=np.float64)
    k = 0
    for j in range(n):
        if not np.isnan(a[j]):
            rest[k] = j
            neg[k] = -np.float64(a[j])  # -0.0 == 0.0 compares equal: the stable order holds
            k += 1
    perm = np.argsort(neg, kind="mergesort")  # mergesort is stable
    for k in range(n - n_nan):
        order[n_nan + k] = rest[perm[k]]
    return order


@numba.njit(parallel=True, cache=True, nogil=True)
def _forward(x, a, keep, fuse, out, idx):
    B, N, C = x.shape
    P = N - 1
    for b in numba.prange(B):
        order = _descending_order(a[b])
        for c in range(C):
            out[b, 0, c] = x[b, 0, c]
        for s in range(keep):
            j = order[s]
            idx[b, s] = j
            for c in range(C):
                out[b, 1 + s, c] = x[b, 1 + j, c]
        if fuse:
            acc = np.zeros(C, dtype=np.float64)
            for s in range(keep, P):
                j = order[s]
                w = np.float64(a[b, j])
                for c in range(C):
                    acc[c] += w * x[b, 1 + j, c]
            for c in range(C):
                out[b, 1 + keep, c] = acc[c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _backward(go, x, a, keep, fuse, gx, ga):
    B, N, C = x.shape
    P = N - 1
    for b in numba.prange(B):
        order = _descending_order(a[b])
        for c in range(C):
            gx[b, 0, c] = go[b, 0, c]
        for s in range(keep):
            j = order[s]
            ga[b, j] = 0.0
            for c in range(C):
                gx[b, 1 + j, c] = go[b, 1 + s, c]
        for s in range(keep, P):
            j = order[s]
            if fuse:
                w = np.float64(a[b, j])
                dot = 0.0
                for c in range(C):
                    g = np.float64(go[b, 1 + keep, c])
                    gx[b, 1 + j, c] = w * g
                    dot += np.float64(x[b, 1 + j, c]) * g
                ga[b, j] = dot
            else:
                ga[b, j] = 0.0
                for c in range(C):
                    gx[b, 1 + j, c] = 0.0


def _np(t: torch.Tensor) -> np.ndarray:
    # a strided (even stride-0) numpy view of the same memory: no copy
    return t.detach().numpy()


def evit_select_forward(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool):
    """x (B, N, C), cls_attn (B, N-1) -> (x_out (B, 1+keep+fused, C), keep_idx (B, keep))."""
    B, N, C = x.shape
    fuse = appends_fused_token(N, keep, fuse)
    out = torch.empty(B, 1 + keep + int(fuse), C, dtype=x.dtype)
    idx = torch.empty(B, keep, dtype=torch.int64)
    if B:
        _forward(_np(x), _np(cls_attn), keep, fuse, out.numpy(), idx.numpy())
    return out, idx


def evit_select_backward(grad_out: torch.Tensor, x: torch.Tensor, cls_attn: torch.Tensor,
                         keep: int, fuse: bool):
    """grad_out (B, 1+keep+fused, C) -> (grad_x (B, N, C), grad_cls (B, N-1))."""
    fuse = appends_fused_token(x.shape[1], keep, fuse)
    gx = torch.empty(x.shape, dtype=x.dtype)
    ga = torch.empty(cls_attn.shape, dtype=cls_attn.dtype)
    if x.shape[0]:
        _backward(_np(grad_out), _np(x), _np(cls_attn), keep, fuse, gx.numpy(), ga.numpy())
    return gx, ga
