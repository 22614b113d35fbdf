#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace xray_ops {
// y = gelu(x + bias): x (M, C) float16 / bfloat16 / float32 with unit stride along C, bias (C,)
// contiguous float32 or none; tanh: the tanh approximation. Returns y (M, C), contiguous.
at::Tensor bias_gelu_forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                             bool tanh);

// Returns {grad_x (M, C), grad_bias (C,) float32 or empty}.
std::vector<at::Tensor> bias_gelu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                           const c10::optional<at::Tensor>& bias, bool tanh);
}  // namespace xray_ops
