"""Definition of GELU and ``bias_gelu`` (pure PyTorch, float64-capable).

The one GELU of the project: ``bias_gelu`` and the int8 GEMM's epilogue
(:mod:`xray_ops.reference.int8`) both use :func:`gelu`, and the kernels implement the same two
formulas (``kernels/gelu.py`` for Triton, ``csrc/gelu.cuh`` for CUDA):

  approximate="none":  gelu(z) = 0.5·z·(1 + erf(z / √2))                      (= z·Φ(z))
  approximate="tanh":  gelu(z) = 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))

(the same two functions as ``torch.nn.functional.gelu(z, approximate=...)``), and their
derivatives:

  none:  gelu'(z) = Φ(z) + z·φ(z),  φ(z) = exp(-z²/2) / √(2π)
  tanh:  gelu'(z) = 0.5·(1 + t) + 0.5·z·(1 - t²)·√(2/π)·(1 + 3·0.044715·z²),  t = tanh(...)

The torch backend (:func:`bias_gelu_forward` / :func:`bias_gelu_backward`) computes in float32
for float16 / bfloat16 inputs (float64 for float64) and rounds once to the input's dtype.
"""

from __future__ import annotations

import math

import torch

APPROXIMATIONS = ("none", "tanh")
SQRT_1_2 = 1.0 / math.sqrt(2.0)
SQRT_2_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
TANH_COEF = 0.044715


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gelu(z: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU of z (any float dtype, computed in z's dtype), either formula of the module doc."""
    if approximate == "tanh":
        return 0.5 * z * (1.0 + torch.tanh(SQRT_2_PI * (z + TANH_COEF * z * z * z)))
    return 0.5 * z * (1.0 + torch.erf(z * SQRT_1_2))


def gelu_grad(z: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d gelu(z) / dz, in z's dtype."""
    if approximate == "tanh":
        t = torch.tanh(SQRT_2_PI * (z + TANH_COEF * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_PI * (
            1.0 + 3.0 * TANH_COEF * z * z)
    return 0.5 * (1.0 + torch.erf(z * SQRT_1_2)) + z * INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"):
    """The definition: gelu(x + bias) with bias (C,) broadcast over the last dim of x (..., C).

    Differentiable by autograd (used as the oracle in the tests, in float64)."""
    z = x if bias is None else x + bias.to(x.dtype)
    return gelu(z, approximate)


# ----------------------------------------------------------------------------------------------
# the torch backend: (M, C) inputs, explicit backward
# ----------------------------------------------------------------------------------------------
def _z(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ct = compute_dtype(x.dtype)
    z = x.to(ct)
    return z if bias is None else z + bias.to(ct)


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor | None, approximate: str):
    """x (M, C), bias (C,) | None -> y (M, C) in x.dtype, contiguous."""
    return gelu(_z(x, bias), approximate).to(x.dtype).contiguous()


def bias_gelu_backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                       approximate: str):
    """-> (grad_x (M, C) in x.dtype, grad_bias (C,) in bias.dtype, or an empty tensor)."""
    z = _z(x, bias)
    gz = grad_y.to(z.dtype) * gelu_grad(z, approximate)
    gb = gz.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return gz.to(x.dtype).contiguous(), gb
