#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace xray_ops {
// LayerNorm over the last dim of x (M, C) (float16 / bfloat16 / float32, unit stride along C),
// optionally after s = residual + gamma * x. weight, bias, gamma: (C,) contiguous float32.
// Returns {y (M, C), s (M, C) or empty, mean (M,) f32, rstd (M,) f32}.
std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias, double eps,
                                           const c10::optional<at::Tensor>& residual,
                                           const c10::optional<at::Tensor>& gamma);

// Gradients: grad_y, grad_s (optional), x = the LayerNorm's input (s), branch = the forward's
// x (needed with gamma), mean / rstd from the forward. Returns {ds (M, C), dx (M, C) or empty,
// dw (C,) f32 or empty, db or empty, dgamma or empty}.
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad_y,
                                            const c10::optional<at::Tensor>& grad_s,
                                            const at::Tensor& x,
                                            const c10::optional<at::Tensor>& branch,
                                            const c10::optional<at::Tensor>& weight, bool has_bias,
                                            const c10::optional<at::Tensor>& gamma,
                                            const at::Tensor& mean, const at::Tensor& rstd);
}  // namespace xray_ops
