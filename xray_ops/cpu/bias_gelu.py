"""numba kernels for ``bias_gelu`` on the CPU (float32), forward and backward.

Rows in parallel (:mod:`xray_ops.cpu._parallel`); per row one vectorized loop (the GELU of
:mod:`xray_ops.cpu.gelu`: no libm calls). The backward recomputes x + bias, writes dx and adds
dx into this chunk's row of a (chunks, C) float32 buffer of bias-gradient partial sums, summed
in a fixed order at the end (deterministic).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import _parallel
from .gelu import gelu, gelu_grad


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fwd_rows(x, b, y, tanh, lo, hi, chunk):
    C = x.shape[1]
    for i in range(lo, hi):
        if tanh:  # the branch outside the loop: each loop vectorizes
            for j in range(C):
                y[i, j] = gelu(np.float32(x[i, j]) + b[j], True)
        else:
            for j in range(C):
                y[i, j] = gelu(np.float32(x[i, j]) + b[j], False)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _bwd_rows(gy, x, b, gx, gb, tanh, lo, hi, chunk):
    C = x.shape[1]
    acc = gb[chunk]
    for i in range(lo, hi):
        if tanh:
            for j in range(C):
                d = np.float32(gy[i, j]) * gelu_grad(np.float32(x[i, j]) + b[j], True)
                gx[i, j] = d
                acc[j] += d
        else:
            for j in range(C):
                d = np.float32(gy[i, j]) * gelu_grad(np.float32(x[i, j]) + b[j], False)
                gx[i, j] = d
                acc[j] += d


def _bias(bias, C: int) -> np.ndarray:
    if bias is None:
        return np.zeros(C, dtype=np.float32)
    # a copy, not a view: Tensor.numpy() marks a parameter's storage non-resizable for good,
    # which FSDP2's resharding (a resize to 0) then fails on
    return bias.detach().to(torch.float32, copy=True).contiguous().numpy()


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """x (M, C) float32 (any strides), bias (C,) | None -> y (M, C) float32, contiguous."""
    M, C = x.shape
    y = torch.empty(M, C, dtype=torch.float32)
    if M and C:
        _parallel.run(_fwd_rows, M, 8 * C, x.detach().numpy(), _bias(bias, C), y.numpy(),
                      approximate == "tanh")
    return y


def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       approximate: str):
    """-> (grad_x (M, C) float32, grad_bias (C,) in bias.dtype, or an empty tensor)."""
    M, C = x.shape
    gx = torch.empty(M, C, dtype=torch.float32)
    gb = torch.zeros(_parallel.chunks(M, 8 * C), C, dtype=torch.float32)
    if M and C:
        _parallel.run(_bwd_rows, M, 8 * C, grad_y.detach().numpy(), x.detach().numpy(),
                      _bias(bias, C), gx.numpy(), gb.numpy(), approximate == "tanh")
    return gx, (gb.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0))
