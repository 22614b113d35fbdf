// Python bindings of the extension xray_ops._C. Each op declares its entry points in its own
// header; the functional layer (xray_ops/ops/*.py) calls them through xray_ops._ext.
#include <torch/extension.h>

#include "bias_gelu/bias_gelu.h"
#include "evit/evit_select.h"
#include "flash_attn/flash_fwd.h"
#include "int8/int8.h"
#include "layer_norm/layer_norm.h"
#include "lion/lion.h"
#include "tome/tome.h"

#ifndef XRAY_OPS_CUDA_ARCHS
#define XRAY_OPS_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xray_ops CUDA kernels";
  m.def("cuda_archs", [] { return std::string(XRAY_OPS_CUDA_ARCHS); },
        "GPU architectures this extension was compiled for");
  m.def("evit_select_forward", &xray_ops::evit_select_forward,
        "EViT select forward: (x, cls_attn, keep, fuse) -> (x_out, keep_idx)");
  m.def("evit_select_backward", &xray_ops::evit_select_backward,
        "EViT select backward: (grad_out, x, cls_attn, keep, fuse) -> (grad_x, grad_cls)");
  m.def("flash_attention_forward", &xray_ops::flash_attention_forward,
        "Flash attention forward: (q, k, v, key_bias, scale, causal) -> (out, lse)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("key_bias"),
        pybind11::arg("scale"), pybind11::arg("causal"));
  m.def("int8_quantize_per_token", &xray_ops::int8_quantize_per_token,
        "per-token int8 quantization: x (M, K) -> (x_q int8 (M, K), scale float32 (M, 1))");
  m.def("int8_layernorm_quant", &xray_ops::int8_layernorm_quant,
        "LayerNorm + per-token int8 quantization: (x, weight, bias, eps) -> (x_q, scale)");
  m.def("int8_matmul", &xray_ops::int8_matmul,
        "int8 GEMM + fused epilogue: (a_q, b_q, a_scale, b_scale, bias, out_dtype, gelu, "
        "gelu_tanh) -> out",
        pybind11::arg("a_q"), pybind11::arg("b_q"), pybind11::arg("a_scale"),
        pybind11::arg("b_scale"), pybind11::arg("bias"), pybind11::arg("out_dtype"),
        pybind11::arg("gelu"), pybind11::arg("gelu_tanh") = false);
  m.def("tome_match", &xray_ops::tome_match,
        "ToMe matching: (metric, r, class_token, distill_token) -> [unm_idx, src_idx, dst_idx, "
        "dest, slot_src, slot_start]");
  m.def("tome_merge_forward", &xray_ops::tome_merge_forward,
        "ToMe merge forward: (x, size, dest, slot_src, slot_start) -> (x_out, size_out)");
  m.def("tome_merge_backward", &xray_ops::tome_merge_backward,
        "ToMe merge backward: (grad_out, grad_size_out, x, size, x_out, size_out, dest, "
        "size_grad) -> (grad_x, grad_size)");
  m.def("layer_norm_forward", &xray_ops::layer_norm_forward,
        "LayerNorm (+ residual, LayerScale) forward: (x, weight, bias, eps, residual, gamma) -> "
        "[y, s, mean, rstd]");
  m.def("layer_norm_backward", &xray_ops::layer_norm_backward,
        "LayerNorm backward: (grad_y, grad_s, x, branch, weight, has_bias, gamma, mean, rstd) -> "
        "[ds, dx, dweight, dbias, dgamma]");
  m.def("bias_gelu_forward", &xray_ops::bias_gelu_forward,
        "bias + GELU forward: (x, bias, tanh) -> y");
  m.def("bias_gelu_backward", &xray_ops::bias_gelu_backward,
        "bias + GELU backward: (grad_y, x, bias, tanh) -> [grad_x, grad_bias]");
  m.def("lion_step", &xray_ops::lion_step,
        "multi-tensor Lion step in place: (params, grads, exp_avgs, lr, beta1, beta2, "
        "weight_decay)");
}
