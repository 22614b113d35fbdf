"""``xray_ops.optim.Lion``: the Lion optimizer as a ``torch.optim.Optimizer``, one fused
multi-tensor update per parameter group (see :mod:`xray_ops.ops.lion`)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .. import _validate
from ..ops.lion import lion_step

_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay as lion-pytorch applies it.

    For each parameter p with gradient g and momentum m (zeros at the first step)::

        p ← p · (1 − lr · wd)
        p ← p − lr · sign(β1 · m + (1 − β1) · g)
        m ← β2 · m + (1 − β2) · g

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: >= 0 (Lion wants 3-10x less than AdamW). betas: (β1, β2), each in [0, 1].
        weight_decay: >= 0 (decoupled, multiplied by lr; Lion wants 3-10x more than AdamW).
        state_dtype: dtype of the momentum: None (the parameter's dtype, as lion-pytorch),
            torch.float32 (e.g. fp32 momentum for bf16 parameters) or torch.bfloat16 (half the
            state memory for fp32 parameters). The update computes in float32 either way.

    On the GPU each parameter group is one kernel launch (per dtype combination) over a table of
    the group's pointers and sizes; on the CPU a numba kernel, parallel over chunks of all the
    group's tensors; elsewhere the reference update. Sparse gradients are refused. Works with
    LR schedulers, closures and ``state_dict`` / ``load_state_dict`` (the momentum keeps
    ``state_dtype`` across a round trip).

    Equivalent PyTorch: ``lion_pytorch.Lion(params, lr, betas, weight_decay)``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple = (0.9, 0.99),
                 weight_decay: float = 0.0, *, state_dtype: torch.dtype | None = None):
        defaults = _check_hparams(dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                       state_dtype=state_dtype))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_hparams(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of every parameter that has a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check_hparams(group)  # a scheduler or the user may have changed them
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"Lion does not support sparse gradients (param group "
                                       f"{gi}, a parameter of shape {tuple(p.shape)}); use a "
                                       f"dense gradient (e.g. nn.Embedding(sparse=False))")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=group["state_dtype"] or p.dtype,
                        memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if params:
                beta1, beta2 = group["betas"]
                lion_step(params, grads, exp_avgs, float(group["lr"]), beta1, beta2,
                          group["weight_decay"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then the momentum back in each group's
        ``state_dtype`` (the base class casts floating state to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "exp_avg" in st:
                    st["exp_avg"] = st["exp_avg"].to(dtype=group["state_dtype"] or p.dtype)


def _check_hparams(group: dict) -> dict:
    _validate.number(group["lr"] if not isinstance(group["lr"], torch.Tensor)
                     else float(group["lr"]), "lr", lo=0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    _validate.number(betas[0], "betas[0]", lo=0.0, hi=1.0)
    _validate.number(betas[1], "betas[1]", lo=0.0, hi=1.0)
    group["betas"] = (float(betas[0]), float(betas[1]))
    _validate.number(group["weight_decay"], "weight_decay", lo=0.0)
    if group.get("state_dtype") not in _STATE_DTYPES:
        raise ValueError(f"state_dtype: expected None, torch.float32 or torch.bfloat16, got "
                         f"{group.get('state_dtype')!r}")
    return group
