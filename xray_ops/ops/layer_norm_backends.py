"""Backend table of ``layer_norm``: one :class:`Impl` per backend, with its limits.

Canonical (dispatched) arguments, 2-D (the op bodies flatten leading dims):
  forward   (x (M, C), weight | None, bias | None, eps, residual (M, C) | None,
             residual_scale | None) -> (y, s or empty, mean (M,), rstd (M,))
  backward  (grad_y (M, C), grad_s (M, C) | None, s (M, C), x (M, C) | None, weight | None,
             bias | None, residual_scale | None, mean, rstd) -> (ds, dx or empty, dw, db, dg)
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._dispatch import Impl, register
from ..reference import layer_norm as ref

OP = "layer_norm"
_F = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_forward(x, weight, bias, eps, residual, residual_scale):
    from ..kernels import layer_norm as k

    return k.layer_norm_forward(x, weight, bias, eps, residual, residual_scale)


def _triton_backward(grad_y, grad_s, s, x, weight, bias, residual_scale, mean, rstd):
    from ..kernels import layer_norm as k

    return k.layer_norm_backward(grad_y, grad_s, s, x, weight, bias, residual_scale, mean, rstd)


def _row_limit(limit: int, kernel: str):
    def check(*args):
        # forward: x (M, C) is argument 0; backward: grad_y (M, C) is argument 0 as well
        C = args[0].shape[-1]
        return [f"C={C} exceeds the {kernel} kernel's row limit {limit}"] if C > limit else []
    return check


def _impl(backend, fwd, bwd, devices, dtypes, check=None):
    return register(Impl(op=OP, backend=backend, forward=fwd, backward=bwd,
                         devices=frozenset(devices), dtypes=frozenset(dtypes), check=check))


_HALF_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# the Triton kernels hold a whole row in registers (kernels/layer_norm.py MAX_C)
TRITON_MAX_C = 16384

_impl("torch", ref.layer_norm_forward, ref.layer_norm_backward, {"cpu", "cuda"}, _F)
_impl("triton", _triton_forward, _triton_backward, {"cuda"}, _HALF_FLOAT,
      _row_limit(TRITON_MAX_C, "Triton"))
_dispatch.set_priority(OP, ("cuda", "triton", "cpu", "torch"))
