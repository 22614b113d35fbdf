"""Definition of ``layer_norm`` with an optional residual and LayerScale (pure PyTorch).

  s = residual + residual_scale ⊙ x     (residual_scale: timm's LayerScale gamma (C,), None = 1)
  y = LayerNorm(s) = (s - mean(s)) / sqrt(var(s) + eps) ⊙ weight + bias

over the last dim; without a residual, s is x. ``s`` is rounded to x's dtype (it is the residual
stream the caller keeps) and y is the LayerNorm of that rounded s, so a fused kernel gives the
numbers of the eager ``s = residual + g * x; y = F.layer_norm(s, ...)`` (up to the one rounding
of ``g * x`` that eager does and the fused kernels skip).

The torch backend (:func:`layer_norm_forward` / :func:`layer_norm_backward`) computes the
statistics in float32 for float16 / bfloat16 (float64 for float64); its backward is the explicit
formula every kernel implements:

  xhat = (s - mean) · rstd,  g_hat = dy ⊙ weight
  ds_total = rstd · (g_hat - mean(g_hat) - xhat · mean(g_hat ⊙ xhat)) + ds
  d_residual = ds_total;  dx = ds_total ⊙ residual_scale;  d_residual_scale = Σ_rows ds_total ⊙ x
  d_weight = Σ_rows dy ⊙ xhat;  d_bias = Σ_rows dy
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bias_gelu import compute_dtype


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-6, residual: torch.Tensor | None = None,
               residual_scale: torch.Tensor | None = None):
    """The definition, differentiable by autograd: x (..., C) -> (y, s), both (..., C).

    In the tests it runs on float64 copies of the inputs (the oracle)."""
    if residual is None:
        s = x
    else:
        s = residual + (x if residual_scale is None else residual_scale.to(x.dtype) * x)
    C = x.shape[-1]
    w = None if weight is None else weight.to(s.dtype)
    b = None if bias is None else bias.to(s.dtype)
    return F.layer_norm(s, (C,), w, b, eps), s


# ----------------------------------------------------------------------------------------------
# the torch backend: 2-D (M, C) inputs, explicit backward
# ----------------------------------------------------------------------------------------------
def layer_norm_forward(x, weight, bias, eps, residual, residual_scale):
    """x (M, C) -> (y (M, C), s (M, C) or an empty tensor without a residual, mean (M,),
    rstd (M,)); y and s in x.dtype, mean / rstd in the compute dtype."""
    ct = compute_dtype(x.dtype)
    if residual is not None:
        xs = x.to(ct) if residual_scale is None else x.to(ct) * residual_scale.to(ct)
        s = (residual.to(ct) + xs).to(x.dtype).contiguous()  # one rounding to the stream dtype
        sf = s.to(ct)
    else:
        s = x.new_empty(0)
        sf = x.to(ct)
    mean = sf.mean(-1)
    var = (sf - mean[:, None]).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (sf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype).contiguous(), s, mean, rstd


def layer_norm_backward(grad_y, grad_s, x, branch, weight, bias, residual_scale, mean, rstd):
    """Gradients of :func:`layer_norm_forward`.

    grad_y (M, C); grad_s (M, C) or None (the gradient reaching the returned s); x (M, C) the
    LayerNorm's input (s, or x itself without a residual); branch (M, C) the forward's x,
    given only with residual_scale (its gradient needs it); weight, bias, residual_scale (C,)
    or None (bias only for its dtype); mean, rstd (M,) from the forward.

    Returns fresh tensors, none aliasing another: (ds_total (M, C) in x's dtype,
    dx (M, C) = ds_total ⊙ residual_scale or empty, d_weight (C,) or empty, d_bias (C,) or
    empty, d_residual_scale (C,) or empty); parameter gradients in the parameter's dtype.
    """
    s = x
    ct = compute_dtype(s.dtype)
    sf = s.to(ct)
    xhat = (sf - mean[:, None].to(ct)) * rstd[:, None].to(ct)
    dy = grad_y.to(ct)
    g_hat = dy if weight is None else dy * weight.to(ct)
    c1 = (g_hat * xhat).mean(-1, keepdim=True)
    c2 = g_hat.mean(-1, keepdim=True)
    ds = rstd[:, None].to(ct) * (g_hat - c2 - xhat * c1)
    if grad_s is not None:
        ds = ds + grad_s.to(ct)
    dw = (dy * xhat).sum(0).to(weight.dtype) if weight is not None else s.new_empty(0)
    db = dy.sum(0).to(bias.dtype) if bias is not None else s.new_empty(0)
    if residual_scale is not None:
        dx = (ds * residual_scale.to(ct)).to(s.dtype).contiguous()
        dg = (ds * branch.to(ct)).sum(0).to(residual_scale.dtype)
    else:
        dx, dg = s.new_empty(0), s.new_empty(0)
    return ds.to(s.dtype).contiguous(), dx, dw, db, dg
