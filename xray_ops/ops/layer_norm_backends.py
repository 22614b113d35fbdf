"""Backend table of ``layer_norm``: one implementation per backend, with its limits.

Dispatched inputs, 2-D (the op bodies flatten leading dims):
  forward   x (M, C), weight | None, bias | None, eps, residual (M, C) | None,
            residual_scale | None  ->  (y, s or empty, mean (M,), rstd (M,))
  backward  grad_y (M, C), grad_s (M, C) | None, x: the LayerNorm's input (s, or x itself
            without a residual) (M, C), branch: the forward's x when residual_scale is given
            (d residual_scale needs it), else None, weight | None, bias | None,
            residual_scale | None, mean, rstd  ->  (ds, dx or empty, dw, db, dg)
"""

from __future__ import annotations

import torch

from .. import _dispatch, _ext
from .._dispatch import FLOATS, GPU_FLOATS, cuda_extension, lazy
from ..reference import layer_norm as ref

OP = "layer_norm"
# the Triton kernels hold a whole row in registers (kernels/layer_norm.py MAX_C)
TRITON_MAX_C = 8192


def _row_limit(limit: int, kernel: str):
    def check(inputs) -> list[str]:
        C = inputs.x.shape[-1]
        return [f"C={C} exceeds the {kernel} kernel's row limit {limit}"] if C > limit else []
    return check


_dispatch.declare(OP, forward=("x", "weight", "bias", "eps", "residual", "residual_scale"),
                  backward=("grad_y", "grad_s", "x", "branch", "weight", "bias",
                            "residual_scale", "mean", "rstd"),
                  key="x", priority=("cuda", "triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.layer_norm_forward, backward=ref.layer_norm_backward,
                   dtypes=FLOATS)
_KERNEL = "xray_ops.kernels.layer_norm"
_triton_limit = _row_limit(TRITON_MAX_C, "Triton")
_dispatch.register(OP, "triton", forward=lazy(_KERNEL, "layer_norm_forward"),
                   backward=lazy(_KERNEL, "layer_norm_backward"), dtypes=GPU_FLOATS,
                   forward_check=_triton_limit, backward_check=_triton_limit)
# ----------------------------------------------------------------------------------------------
# the CUDA kernels take rows with unit stride along C and float32 parameter vectors
# ----------------------------------------------------------------------------------------------
def _unit(t):
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _cuda_forward(x, weight, bias, eps, residual, residual_scale):
    return tuple(_ext.get().layer_norm_forward(_unit(x), _f32(weight), _f32(bias), eps,
                                               _unit(residual), _f32(residual_scale)))


def _cuda_backward(grad_y, grad_s, x, branch, weight, bias, residual_scale, mean, rstd):
    ds, dx, dw, db, dg = _ext.get().layer_norm_backward(
        _unit(grad_y), _unit(grad_s), _unit(x), _unit(branch), _f32(weight), bias is not None,
        _f32(residual_scale), mean.contiguous(), rstd.contiguous())
    cast = [p.dtype if p is not None else None for p in (weight, bias, residual_scale)]
    dw, db, dg = (g.to(c) if c is not None else g for g, c in zip((dw, db, dg), cast))
    return ds, dx, dw, db, dg


# csrc/layer_norm/layer_norm.cu kMaxRow, kBwdMaxRow: wider backward rows go to Triton's
# chunked kernel (the CUDA one keeps the row in registers and would spill)
CUDA_MAX_C, CUDA_BWD_MAX_C = 8192, 4096
_dispatch.register(OP, "cuda", forward=_cuda_forward, backward=_cuda_backward, dtypes=GPU_FLOATS,
                   runtime=cuda_extension("layer_norm_forward"),
                   forward_check=_row_limit(CUDA_MAX_C, "CUDA"),
                   backward_check=_row_limit(CUDA_BWD_MAX_C, "CUDA backward"))

_CPU = "xray_ops.cpu.layer_norm"
_dispatch.register(OP, "cpu", forward=lazy(_CPU, "layer_norm_forward"),
                   backward=lazy(_CPU, "layer_norm_backward"), dtypes=(torch.float32,))
