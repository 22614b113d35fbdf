"""Bias add + GELU in one pass: validation, torch.library op, autograd, backend table.

Public: :func:`bias_gelu`. The definition (and the one GELU the int8 GEMM epilogue shares):
:mod:`xray_ops.reference.bias_gelu`.

Canonical (dispatched) arguments, 2-D:
  forward   (x (M, C), bias (C,) | None, approximate) -> y (M, C)
  backward  (grad_y (M, C), x (M, C), bias | None, approximate) -> (grad_x, grad_bias or empty)
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._dispatch import Impl, register
from ..reference import bias_gelu as ref
from ._train_common import channel_param, features, rows

OP = "bias_gelu"


def _approximate(approximate) -> str:
    if approximate not in ref.APPROXIMATIONS:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    return approximate


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"):
    """GELU(x + bias) in one pass (the fc1 epilogue of a ViT MLP), forward and backward.

    Args:
        x: (..., C) float16 / bfloat16 / float32 / float64, any strides.
        bias: (C,) in x's dtype or float32, or None.
        approximate: "none" (exact, erf) or "tanh", as ``torch.nn.functional.gelu``.

    Returns:
        (..., C) in x's dtype, computed in float32 (float64 for float64). Differentiable in x
        and bias; the backward recomputes x + bias (nothing but x is kept).

    Equivalent PyTorch::

        torch.nn.functional.gelu(x + bias, approximate=approximate)
    """
    C = features(x, "x")
    channel_param(bias, "bias", x, C)
    approximate = _approximate(approximate)
    return torch.ops.xray_ops.bias_gelu(x, bias, approximate, _dispatch.requested_backend())


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                  backend: str) -> torch.Tensor:
    return _dispatch.run(OP, backend, (rows(x), bias, approximate)).reshape(x.shape)


@_bias_gelu_op.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("xray_ops::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                           approximate: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gb = _dispatch.run(OP, backend, (rows(grad_y), rows(x), bias, approximate),
                           backward=True)
    return gx.reshape(x.shape), gb


@_bias_gelu_backward_op.register_fake
def _(grad_y, x, bias, approximate, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    gx, gb = _bias_gelu_backward_op(grad_y, x, bias, ctx.approximate, ctx.backend)
    return gx, (gb if bias is not None else None), None, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _triton_forward(x, bias, approximate):
    from ..kernels import bias_gelu as k

    return k.bias_gelu_forward(x, bias, approximate)


def _triton_backward(grad_y, x, bias, approximate):
    from ..kernels import bias_gelu as k

    return k.bias_gelu_backward(grad_y, x, bias, approximate)


def _impl(backend, fwd, bwd, devices, dtypes, check=None):
    return register(Impl(op=OP, backend=backend, forward=fwd, backward=bwd,
                         devices=frozenset(devices), dtypes=frozenset(dtypes), check=check))


_F = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_impl("torch", ref.bias_gelu_forward, ref.bias_gelu_backward, {"cpu", "cuda"}, _F)
_impl("triton", _triton_forward, _triton_backward, {"cuda"}, _HALF_FLOAT)
_dispatch.set_priority(OP, ("cuda", "triton", "cpu", "torch"))
