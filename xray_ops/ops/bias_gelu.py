"""Bias add + GELU in one pass: validation, torch.library op, autograd, backend table.

Public: :func:`bias_gelu`. The definition (and the one GELU the int8 GEMM epilogue shares):
:mod:`xray_ops.reference.bias_gelu`.

Dispatched inputs, 2-D:
  forward   x (M, C), bias (C,) | None, approximate  ->  y (M, C)
  backward  grad_y (M, C), x (M, C), bias | None, approximate  ->  (grad_x, grad_bias or empty)
"""

from __future__ import annotations

import torch

from .. import _dispatch, _ext
from .._dispatch import FLOATS, GPU_FLOATS, cuda_extension, lazy
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
    return _dispatch.run(OP, backend, x=rows(x), bias=bias,
                         approximate=approximate).reshape(x.shape)


@_bias_gelu_op.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("xray_ops::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                           approximate: str,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gb = _dispatch.run_backward(OP, backend, grad_y=rows(grad_y), x=rows(x), bias=bias,
                                    approximate=approximate)
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
_dispatch.declare(OP, forward=("x", "bias", "approximate"),
                  backward=("grad_y", "x", "bias", "approximate"), key="x",
                  priority=("cuda", "triton", "cpu", "torch"))
_dispatch.register(OP, "torch", forward=ref.bias_gelu_forward, backward=ref.bias_gelu_backward,
                   dtypes=FLOATS)
_KERNEL = "xray_ops.kernels.bias_gelu"
_dispatch.register(OP, "triton", forward=lazy(_KERNEL, "bias_gelu_forward"),
                   backward=lazy(_KERNEL, "bias_gelu_backward"), dtypes=GPU_FLOATS)


def _unit(t):
    # the CUDA kernels take rows with unit stride along C and a float32 bias
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _cuda_forward(x, bias, approximate):
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return _ext.get().bias_gelu_forward(_unit(x), b, approximate == "tanh")


def _cuda_backward(grad_y, x, bias, approximate):
    b = None if bias is None else bias.to(torch.float32).contiguous()
    gx, gb = _ext.get().bias_gelu_backward(_unit(grad_y), _unit(x), b, approximate == "tanh")
    return gx, (gb.to(bias.dtype) if bias is not None else gb)


_dispatch.register(OP, "cuda", forward=_cuda_forward, backward=_cuda_backward, dtypes=GPU_FLOATS,
                   runtime=cuda_extension("bias_gelu_forward"))
_CPU = "xray_ops.cpu.bias_gelu"
_dispatch.register(OP, "cpu", forward=lazy(_CPU, "bias_gelu_forward"),
                   backward=lazy(_CPU, "bias_gelu_backward"), dtypes=(torch.float32,))
