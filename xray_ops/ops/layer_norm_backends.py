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


def _impl(backend, fwd, bwd, devices, dtypes, check=None):
    return register(Impl(op=OP, backend=backend, forward=fwd, backward=bwd,
                         devices=frozenset(devices), dtypes=frozenset(dtypes), check=check))


_impl("torch", ref.layer_norm_forward, ref.layer_norm_backward, {"cpu", "cuda"}, _F)
_dispatch.set_priority(OP, ("cuda", "triton", "cpu", "torch"))
