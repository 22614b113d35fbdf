"""Validation helpers shared by the training ops (layer_norm, bias_gelu, contrastive_loss)."""

from __future__ import annotations

import torch

from .. import _validate

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def features(x: torch.Tensor, name: str = "x") -> int:
    """C = x.shape[-1] >= 1 of a floating tensor with at least one dim."""
    _validate.tensor(x, name, floating=True)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected a tensor (..., C) with C >= 1, "
                         f"got shape {tuple(x.shape)}")
    return x.shape[-1]


def channel_param(t, name: str, x: torch.Tensor, C: int) -> None:
    """A per-channel parameter (C,) on x's device, in x's dtype or float32 (fp32 master weights
    beside bf16 / fp16 activations); None passes."""
    if t is None:
        return
    _validate.tensor(t, name, ndim=1, floating=True)
    _validate.shape(t, name, (C,), f"(C,) for x of shape {tuple(x.shape)}")
    _validate.same_device("x", x, **{name: t})
    if t.dtype not in (x.dtype, torch.float32):
        want = _dt(x.dtype) + (" (like x)" if x.dtype == torch.float32 else " (like x) or float32")
        raise TypeError(f"{name}: expected dtype {want}, got {_dt(t.dtype)}")


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (M, C), a view where the strides allow (backends take row strides)."""
    return t.reshape(-1, t.shape[-1])
