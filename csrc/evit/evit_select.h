#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace xray_ops {
std::tuple<at::Tensor, at::Tensor> evit_select_forward(const at::Tensor& x,
                                                       const at::Tensor& cls_attn, int64_t keep,
                                                       bool fuse);
std::tuple<at::Tensor, at::Tensor> evit_select_backward(const at::Tensor& grad_out,
                                                        const at::Tensor& x,
                                                        const at::Tensor& cls_attn, int64_t keep,
                                                        bool fuse);
}  // namespace xray_ops
