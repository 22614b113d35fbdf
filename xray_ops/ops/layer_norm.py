"""LayerNorm with a fused residual add and LayerScale: validation, torch.library op, autograd.

Public: :func:`layer_norm`. The definition: :mod:`xray_ops.reference.layer_norm`; the backend
table: :mod:`xray_ops.ops.layer_norm_backends`.
"""

from __future__ import annotations

import torch

from .. import _dispatch, _validate
from . import layer_norm_backends  # noqa: F401  (registers the Impls)
from ._train_common import channel_param, features, rows

OP = "layer_norm"


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-6, *, residual: torch.Tensor | None = None,
               residual_scale: torch.Tensor | None = None):
    """LayerNorm over the last dim, optionally after a residual add with LayerScale, in one pass.

    With a residual it does a ViT block's ``x = x + ls1(attn(...))`` followed by ``norm2(x)``:
    ``s = residual + residual_scale * x`` (the new residual stream), ``y = LayerNorm(s)``.

    Args:
        x: (..., C) float16 / bfloat16 / float32 / float64, C >= 1, any strides. With a residual
            it is the branch output (attention or MLP) that is added.
        weight, bias: (C,) or None, in x's dtype or float32.
        eps: >= 0 (timm's ViT uses 1e-6).
        residual: (..., C) like x (same shape, dtype, device) or None.
        residual_scale: (C,) LayerScale gamma, in x's dtype or float32, or None for 1; only
            with a residual.

    Returns:
        (y, s), both (..., C) in x's dtype: y = LayerNorm(s); s = residual + residual_scale * x
        (rounded once to x's dtype), or x itself without a residual. Statistics in float32
        (float64 for float64). Differentiable in x, residual, residual_scale, weight and bias.

    Equivalent PyTorch::

        s = x if residual is None else residual + (x if residual_scale is None
                                                   else residual_scale * x)
        y = torch.nn.functional.layer_norm(s, (C,), weight, bias, eps)
    """
    C = features(x, "x")
    channel_param(weight, "weight", x, C)
    channel_param(bias, "bias", x, C)
    if residual is not None:
        _validate.tensor(residual, "residual")
        _validate.same_device("x", x, residual=residual)
        _validate.same_dtype("x", x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} (like x), "
                             f"got {tuple(residual.shape)}")
    if residual_scale is not None:
        if residual is None:
            raise ValueError("residual_scale: given without a residual (s = residual + "
                             "residual_scale * x needs both); pass residual= or drop it")
        channel_param(residual_scale, "residual_scale", x, C)
    eps = _validate.number(eps, "eps", lo=0.0)
    y, s, _, _ = torch.ops.xray_ops.layer_norm(x, weight, bias, eps, residual, residual_scale,
                                               _dispatch.requested_backend())
    return y, (x if residual is None else s)


# ----------------------------------------------------------------------------------------------
# torch.library registration: the op bodies flatten leading dims, backends see (M, C)
# ----------------------------------------------------------------------------------------------
def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("xray_ops::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, residual: torch.Tensor | None,
                   residual_scale: torch.Tensor | None,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r = None if residual is None else rows(residual)
    y, s, mean, rstd = _dispatch.run(OP, backend, x=rows(x), weight=weight, bias=bias, eps=eps,
                                     residual=r, residual_scale=residual_scale)
    lead = x.shape[:-1]
    return (y.reshape(x.shape), s.reshape(x.shape) if residual is not None else s,
            mean.reshape(lead), rstd.reshape(lead))


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual, residual_scale, backend):
    lead = x.shape[:-1]
    st = _stats_dtype(x)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None \
        else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), s,
            x.new_empty(lead, dtype=st), x.new_empty(lead, dtype=st))


@torch.library.custom_op("xray_ops::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
        grad_y: torch.Tensor, grad_s: torch.Tensor | None, s: torch.Tensor,
        x: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
        residual_scale: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    gs = None if grad_s is None else rows(grad_s)
    xr = None if x is None else rows(x)
    ds, dx, dw, db, dg = _dispatch.run_backward(
        OP, backend, grad_y=rows(grad_y), grad_s=gs, x=rows(s), branch=xr, weight=weight,
        bias=bias, residual_scale=residual_scale, mean=mean.reshape(-1), rstd=rstd.reshape(-1))
    return ds.reshape(s.shape), (dx.reshape(s.shape) if dx.numel() else dx), dw, db, dg


@_layer_norm_backward_op.register_fake
def _(grad_y, grad_s, s, x, weight, bias, residual_scale, mean, rstd, backend):
    full = torch.empty_like(s, memory_format=torch.contiguous_format)
    return (full, torch.empty_like(full) if residual_scale is not None else s.new_empty(0),
            torch.empty_like(weight) if weight is not None else s.new_empty(0),
            torch.empty_like(bias) if bias is not None else s.new_empty(0),
            torch.empty_like(residual_scale) if residual_scale is not None else s.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, residual_scale, backend = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.backend = backend
    # the normalized input (s, an output the caller keeps anyway, or x), and x itself only when
    # d residual_scale needs it
    ctx.save_for_backward(s if ctx.has_residual else x,
                          x if residual_scale is not None else None,
                          weight, bias, residual_scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_s, _grad_mean, _grad_rstd):
    s, x, weight, bias, residual_scale, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(s)
    if not ctx.has_residual:
        grad_s = None  # s was an empty placeholder: the caller's s is x itself
    ds, dx, dw, db, dg = _layer_norm_backward_op(grad_y, grad_s, s, x, weight, bias,
                                                 residual_scale, mean, rstd, ctx.backend)
    grad_x = dx if residual_scale is not None else ds
    return (grad_x, dw if weight is not None else None, db if bias is not None else None, None,
            ds if ctx.has_residual else None, dg if residual_scale is not None else None, None)


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
