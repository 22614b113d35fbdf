"""The one GELU of the numba kernels (``bias_gelu`` and the int8 GEMM epilogue), float32, in
forms LLVM vectorizes (libm's erff / expf calls do not: numba has no vector math library here).

  erf32:  Eigen's generic_fast_erf_float, x·P(x²)/Q(x²) on [-4, 4] (max abs error 4.5e-7;
          erf(±4) rounds to ±1 in float32)
  exp32:  Cephes' expf: 2^n · p(r), r = x − n·ln 2 in [−ln2/2, ln2/2], a degree-6 polynomial,
          2^n built from its exponent bits (about 1 ulp; inputs below −87.3 give ~1e-38, not 0)

and the two GELUs of :mod:`xray_ops.reference.bias_gelu` on top of them (the tanh form through
the logistic: 0.5·(1 + tanh(u)) = σ(2u)).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (an LLVM bitcast: free, and it vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@numba.njit(inline="always")
def exp32(x):
    x = np.float32(88.72283) if x > np.float32(88.72283) else x  # selects: they vectorize
    x = np.float32(-87.33654) if x < np.float32(-87.33654) else x
    fx = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - fx * np.float32(0.693359375) - fx * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(fx) + np.int32(127)) << np.int32(23))


@numba.njit(inline="always")
def erf32(a):
    x = np.float32(4.0) if a > np.float32(4.0) else a
    x = np.float32(-4.0) if x < np.float32(-4.0) else x
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@numba.njit(inline="always")
def _sigmoid_2u(z):
    u = np.float32(0.7978845608028654) * (z + np.float32(0.044715) * z * z * z)
    return np.float32(1.0) / (np.float32(1.0) + exp32(np.float32(-2.0) * u))


@numba.njit(inline="always")
def gelu(z, tanh):
    """GELU of a float32 (the tanh form when ``tanh``)."""
    if tanh:
        return z * _sigmoid_2u(z)
    return np.float32(0.5) * z * (np.float32(1.0) + erf32(z * np.float32(0.7071067811865476)))


@numba.njit(inline="always")
def gelu_grad(z, tanh):
    """d gelu(z) / dz of a float32."""
    if tanh:
        sg = _sigmoid_2u(z)
        return sg + np.float32(2.0) * z * sg * (np.float32(1.0) - sg) * np.float32(
            0.7978845608028654) * (np.float32(1.0) + np.float32(3.0 * 0.044715) * z * z)
    cdf = np.float32(0.5) * (np.float32(1.0) + erf32(z * np.float32(0.7071067811865476)))
    return cdf + z * np.float32(0.3989422804014327) * exp32(np.float32(-0.5) * z * z)
