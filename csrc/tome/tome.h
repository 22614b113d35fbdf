#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace xray_ops {
// ToMe bipartite soft matching: metric (B, N, D), r already clamped to [1, (N - protected) / 2]
// -> {unm_idx (B, Na-r), src_idx (B, r), dst_idx (B, r), dest (B, N), slot_src (B, N),
//     slot_start (B, N-r+1)}, all int64 (see xray_ops.ToMeMatch).
std::vector<at::Tensor> tome_match(const at::Tensor& metric, int64_t r, bool class_token,
                                   bool distill_token);

// Size-weighted merge along a matching: x (B, N, C), size (B, N, 1) or None
// -> (x_out (B, n_out, C), size_out (B, n_out, 1)).
std::tuple<at::Tensor, at::Tensor> tome_merge_forward(const at::Tensor& x,
                                                      const std::optional<at::Tensor>& size,
                                                      const at::Tensor& dest,
                                                      const at::Tensor& slot_src,
                                                      const at::Tensor& slot_start);

// -> (grad_x (B, N, C), grad_size (B, N, 1)); grad_size is zeros unless size_grad.
std::tuple<at::Tensor, at::Tensor> tome_merge_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size_out,
    const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& x_out,
    const at::Tensor& size_out, const at::Tensor& dest, bool size_grad);
}  // namespace xray_ops
