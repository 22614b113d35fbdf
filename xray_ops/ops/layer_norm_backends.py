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

from .. import _dispatch
from .._dispatch import FLOATS, GPU_FLOATS, lazy
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
_CPU = "xray_ops.cpu.layer_norm"
_dispatch.register(OP, "cpu", forward=lazy(_CPU, "layer_norm_forward"),
                   backward=lazy(_CPU, "layer_norm_backward"), dtypes=(torch.float32,))
