#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace xray_ops {
// x (M, K) float16/bfloat16/float32, unit stride along K -> (x_q (M, K) int8, scale (M, 1) f32)
std::tuple<at::Tensor, at::Tensor> int8_quantize_per_token(const at::Tensor& x);

// LayerNorm over the last dim, quantized per token in the same pass. weight, bias: (C,) f32.
std::tuple<at::Tensor, at::Tensor> int8_layernorm_quant(const at::Tensor& x,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias,
                                                        double eps);

// (M, K) int8 @ (N, K) int8 ^T on the tensor cores (mma.sync m16n8k32 s8), fused epilogue:
// acc * a_scale[m] * b_scale[n] (+ bias[n]) (-> GELU: exact, or tanh with gelu_tanh; the GELU
// of bias_gelu, gelu.cuh) in float32, one cast to out_dtype.
// a_scale (M,), b_scale (N,), bias (N,): contiguous float32.
at::Tensor int8_matmul(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias,
                       c10::ScalarType out_dtype, bool gelu, bool gelu_tanh = false);
}  // namespace xray_ops
