"""The one GELU of the Triton kernels (``bias_gelu`` and the int8 GEMM epilogue), the formulas of
:mod:`xray_ops.reference.bias_gelu`, in float32:

  exact (TANH=False):  gelu(z) = 0.5·z·(1 + erf(z/√2)),  gelu'(z) = Φ(z) + z·φ(z)
  tanh  (TANH=True):   gelu(z) = 0.5·z·(1 + tanh(u)) = z·σ(2u),  u = √(2/π)·(z + 0.044715·z³)
                       gelu'(z) = σ(2u) + 2·z·σ(2u)·(1 − σ(2u))·√(2/π)·(1 + 3·0.044715·z²)

The tanh form goes through the logistic σ (0.5·(1 + tanh(u)) = σ(2u)): one exp, no tanh
intrinsic needed, saturating cleanly to 0 or z for large |z|.
"""

import triton
import triton.language as tl

SQRT_1_2 = 0.7071067811865476
SQRT_2_PI = 0.7978845608028654  # √(2/π)
INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π)
TANH_COEF = 0.044715


@triton.jit
def _sigmoid_2u(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return 1.0 / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def gelu(z, TANH: tl.constexpr):
    """GELU of a float32 tile (exact erf form, or the tanh form when TANH)."""
    if TANH:
        return z * _sigmoid_2u(z)
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def gelu_grad(z, TANH: tl.constexpr):
    """d gelu(z) / dz of a float32 tile."""
    if TANH:
        sg = _sigmoid_2u(z)
        return sg + 2.0 * z * sg * (1.0 - sg) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
