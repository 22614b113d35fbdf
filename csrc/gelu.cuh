// The one GELU of the CUDA kernels (bias_gelu and the int8 GEMM epilogue): the formulas of
// xray_ops/reference/bias_gelu.py (and kernels/gelu.py), in float32.
//
//   exact (kTanh = false): gelu(z) = 0.5 z (1 + erf(z / sqrt 2)),  gelu'(z) = Phi(z) + z phi(z)
//   tanh  (kTanh = true):  gelu(z) = z sigma(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
//                          gelu'(z) = sigma + 2 z sigma (1 - sigma) sqrt(2/pi) (1 + 3 0.044715 z^2)
//
// (0.5 (1 + tanh(u)) = sigma(2u): one exp, saturating cleanly for large |z|.)
#pragma once

namespace xray_ops {

__device__ __forceinline__ float gelu_sigmoid_2u(float z) {
  const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
  return 1.f / (1.f + expf(-2.f * u));
}

template <bool kTanh>
__device__ __forceinline__ float gelu(float z) {
  if constexpr (kTanh) {
    return z * gelu_sigmoid_2u(z);
  } else {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
  }
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float z) {
  if constexpr (kTanh) {
    const float s = gelu_sigmoid_2u(z);
    return s + 2.f * z * s * (1.f - s) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * z * z);
  } else {
    const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
    return cdf + z * 0.3989422804014327f * expf(-0.5f * z * z);
  }
}

}  // namespace xray_ops
