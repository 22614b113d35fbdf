"""Backend table of ``layer_norm``: one :class:`Impl` per backend, with its limits.

Canonical (dispatched) arguments, 2-D (the op bodies flatten leading dims):
  forward   (x (M, C), weight | None, bias | None, eps, residual (M, C) | None,
             residual_scale | None) -> (y, s or empty, mean (M,), rstd (M,))
  backward  (grad_y (M, C), grad_s (M, C) | None, s (M, C), x (M, C) | None, weight | None,
             bias | None, residual_scale | None, mean, rstd) -> (ds, dx or empty, dw, db, dg),
            declared as (grad_y, grad_s, x=s, branch=x, ...): see below
"""

from __future__ import annotations

from .._dispatch import FLOATS, declare, register
from ..reference import layer_norm as ref

OP = "layer_norm"

# The backward's "x" is the normalized input s (x itself without a residual), a tensor in both
# directions as the dispatcher's key must be; "branch" is the branch output x, kept only for
# d residual_scale (None otherwise).
declare(OP, forward=("x", "weight", "bias", "eps", "residual", "residual_scale"),
        backward=("grad_y", "grad_s", "x", "branch", "weight", "bias", "residual_scale",
                  "mean", "rstd"),
        key="x", priority=("cuda", "triton", "cpu", "torch"))
register(OP, "torch", forward=ref.layer_norm_forward, backward=ref.layer_norm_backward,
         dtypes=FLOATS)
