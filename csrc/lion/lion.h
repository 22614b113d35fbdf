#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace xray_ops {
// One Lion step of every (param, grad, exp_avg) triple, in place, in one launch: params and
// grads float32 or bfloat16 (one dtype), exp_avgs float32 or bfloat16 (one dtype), contiguous,
// on one device. p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g.
void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, double lr, double beta1, double beta2,
               double weight_decay);
}  // namespace xray_ops
