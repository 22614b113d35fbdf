"""Definition of the Lion update (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), with decoupled weight decay as lion-pytorch applies it. For a parameter p, its
gradient g and its momentum m (zeros at the first step), one step with lr, (β1, β2), wd:

  p ← p · (1 − lr · wd)
  u = sign(β1 · m + (1 − β1) · g)          (sign(0) = 0)
  p ← p − lr · u
  m ← β2 · m + (1 − β2) · g

Computed in float32 for float16 / bfloat16 parameters or state (float64 when any is float64) and
rounded once into p's and m's storage dtype, so bf16 parameters may keep fp32 momentum and fp32
parameters bf16 momentum.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


@torch.no_grad()
def lion_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float, beta1: float,
                 beta2: float, weight_decay: float) -> None:
    """One Lion step of one tensor, in place on p and m (any shape, strides and float dtypes)."""
    ct = _compute_dtype(p, g, m)
    pf, gf, mf = p.to(ct), g.to(ct), m.to(ct)
    u = torch.sign(mf * beta1 + gf * (1.0 - beta1))
    p.copy_(pf * (1.0 - lr * weight_decay) - lr * u)
    m.copy_(mf * beta2 + gf * (1.0 - beta2))


def lion_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              exp_avgs: Sequence[torch.Tensor], lr: float, beta1: float, beta2: float,
              weight_decay: float) -> None:
    """The torch backend of the ``lion`` op: :func:`lion_update_` on every tensor."""
    for p, g, m in zip(params, grads, exp_avgs):
        lion_update_(p, g, m, lr, beta1, beta2, weight_decay)
