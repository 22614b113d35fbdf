// Flash attention forward on CUDA (tensor cores, fp16 / bf16): the entry point bound as
// xray_ops._C.flash_attention_forward. Kernel: flash_fwd_kernel.cuh; index formulas and the
// fragment layouts they rely on: fragment_layout.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace xray_ops {

// out, lse = flash_attention_forward(q, k, v, key_bias, scale, causal)
//
//   q: (B, H, Nq, D); k, v: (B, H, Nk, D); float16 or bfloat16 (one dtype), same CUDA device;
//      D in {32, 64, 80, 96, 128}; stride(-1) == 1, every other stride arbitrary (torch SDPA's
//      layout, or timm's packed qkv (B, N, 3, H, D) permuted to (B, H, N, D): read in place).
//   key_bias: None or (B, Nk) float32, any strides; added to every logit of key j for every
//      head and query (ToMe's proportional attention: log(size)).
//   scale: the softmax scale (callers pass 1/sqrt(D) by default).
//   causal: query i sees keys 0..i (top-left aligned, torch SDPA's is_causal:
//      mask = ones(Nq, Nk).tril()).
// Returns out (B, H, Nq, D) in q's dtype, a transposed view of (B, Nq, H, D) storage (so
// out.transpose(1, 2).reshape(B, Nq, H * D) is free), and lse (B, H, Nq) float32 contiguous:
// the natural-log log-sum-exp of each row of scale * q kᵀ + key_bias.
//
// Equivalent PyTorch:
//   s = scale * q.float() @ k.float().transpose(-1, -2) + key_bias[:, None, None, :]
//   if causal: s = s.masked_fill(~torch.ones(Nq, Nk, dtype=bool).tril(), -inf)
//   lse = s.logsumexp(-1); out = (s.softmax(-1) @ v.float()).to(q.dtype)
//
// Edge cases (defined, no launch where there is nothing to compute):
//   B * H == 0 or Nq == 0: empty out and lse.
//   Nk == 0: out = 0, lse = -inf (the sum over no keys).
//   A row whose logits are all -inf (e.g. key_bias = -inf on every key): out = 0, lse = -inf
//   (the reference's softmax would give NaN there; this is flash-attn's convention).
//   NaN in q, k or v propagates to the rows it touches.
std::tuple<at::Tensor, at::Tensor> flash_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_bias, double scale, bool causal);

}  // namespace xray_ops
