// Host side of the flash attention forward: argument checks (all before any launch), output
// allocation, the edge cases without a launch, and dispatch on (dtype, head dim).
// A .cpp (host compiler) on purpose: only the flash_fwd_hdim*.cu files carry device code.
// Narrow headers instead of <ATen/ATen.h> (all operators): this file compiles in seconds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "flash_attn/flash_fwd.h"
#include "flash_attn/flash_fwd_launch.h"

namespace xray_ops {
namespace {

using flash::ElemType;
using flash::FwdParams;

constexpr const char* kOp = "flash_attention_forward: ";

bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 80 || d == 96 || d == 128; }

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), kOp, name, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK(t.is_cuda(), kOp, name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 4, kOp, name, ": expected a 4-D tensor (B, H, N, D), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, kOp, name,
              ": expected dtype float16 or bfloat16, got ", t.scalar_type());
}

// cp.async moves 16 bytes: every row start must be 16-byte aligned (else the kernel falls
// back to 2-byte loads).
bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& key_bias, double scale, bool causal) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  TORCH_CHECK(k.device() == q.device(), kOp, "k: expected a tensor on ", q.device(),
              " (q's device), got one on ", k.device());
  TORCH_CHECK(v.device() == q.device(), kOp, "v: expected a tensor on ", q.device(),
              " (q's device), got one on ", v.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, "k: expected dtype ", q.scalar_type(),
              " (q's dtype), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), kOp, "v: expected dtype ", q.scalar_type(),
              " (q's dtype), got ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H, kOp, "k: expected batch and heads (", B, ", ",
              H, ") as in q, got shape ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H, kOp, "v: expected batch and heads (", B, ", ",
              H, ") as in q, got shape ", v.sizes());
  TORCH_CHECK(v.size(2) == Nk, kOp, "v: expected ", Nk, " keys (k.size(2)), got shape ",
              v.sizes());
  TORCH_CHECK(k.size(3) == D, kOp, "k: expected head dim ", D, " (q.size(-1)), got shape ",
              k.sizes());
  TORCH_CHECK(v.size(3) == D, kOp, "v: expected head dim ", D, " (q.size(-1)), got shape ",
              v.sizes());
  TORCH_CHECK(supported_head_dim(D), kOp,
              "q: expected head dim 32, 64, 80, 96 or 128, got ", D, " (shape ", q.sizes(), ")");
  TORCH_CHECK(q.stride(3) == 1, kOp, "q: expected a unit stride on the head dim "
              "(stride(-1) == 1), got strides ", q.strides());
  TORCH_CHECK(k.stride(3) == 1, kOp, "k: expected a unit stride on the head dim "
              "(stride(-1) == 1), got strides ", k.strides());
  TORCH_CHECK(v.stride(3) == 1, kOp, "v: expected a unit stride on the head dim "
              "(stride(-1) == 1), got strides ", v.strides());
  const bool has_bias = key_bias.has_value() && key_bias->defined();
  if (has_bias) {
    const at::Tensor& kb = *key_bias;
    TORCH_CHECK(kb.is_cuda() && kb.device() == q.device(), kOp, "key_bias: expected a tensor on ",
                q.device(), " (q's device), got one on ", kb.device());
    TORCH_CHECK(kb.scalar_type() == at::kFloat, kOp, "key_bias: expected dtype float32, got ",
                kb.scalar_type());
    TORCH_CHECK(kb.dim() == 2 && kb.size(0) == B && kb.size(1) == Nk, kOp,
                "key_bias: expected shape (", B, ", ", Nk, ") = (B, Nk), got ", kb.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(kb.data_ptr()) % 4 == 0, kOp,
                "key_bias: expected a 4-byte aligned data pointer");
  }
  TORCH_CHECK(std::isfinite(scale), kOp, "scale: expected a finite number, got ", scale);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(Nq <= kIntMax && Nk <= kIntMax, kOp, "q, k: at most 2^31 - 1 tokens, got Nq = ",
              Nq, ", Nk = ", Nk);
  const int64_t num_m_blocks = (Nq + flash::kBlockM - 1) / flash::kBlockM;
  const int64_t grid = B * H * num_m_blocks;
  TORCH_CHECK(grid <= kIntMax, kOp, "q: B * H * ceil(Nq / ", flash::kBlockM,
              ") must be below 2^31, got ", grid, " (shape ", q.sizes(), ")");

  const c10::cuda::CUDAGuard guard(q.device());
  // (B, Nq, H, D) storage seen as (B, H, Nq, D): what a ViT reshapes to (B, N, H * D) next,
  // without a copy. Rows stay 16-byte aligned: D is a multiple of 8.
  auto out = at::empty({B, Nq, H, D}, q.options()).transpose(1, 2);
  auto lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B * H * Nq == 0) return {out, lse};
  if (Nk == 0) {  // softmax over no keys: the empty sum
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  FwdParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.key_bias = has_bias ? key_bias->data_ptr<float>() : nullptr;
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_n = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_n = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_n = v.stride(2);
  p.bias_stride_b = has_bias ? key_bias->stride(0) : 0;
  p.bias_stride_n = has_bias ? key_bias->stride(1) : 0;
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.out_stride_n = out.stride(2);
  p.heads = static_cast<int>(H);
  p.n_q = static_cast<int>(Nq);
  p.n_k = static_cast<int>(Nk);
  p.num_m_blocks = static_cast<int>(num_m_blocks);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  p.causal = causal;
  p.vec16 = rows_16b_aligned(q) && rows_16b_aligned(k) && rows_16b_aligned(v);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q.scalar_type() == at::kHalf;
  cudaError_t err = cudaSuccess;
  switch (D) {
#define XO_FLASH_CASE(HD)                                                          \
  case HD:                                                                         \
    err = half ? flash::run_flash_fwd<ElemType::kHalf, HD>(p, grid, stream)        \
               : flash::run_flash_fwd<ElemType::kBFloat16, HD>(p, grid, stream);   \
    break;
    XO_FLASH_CASE(32)
    XO_FLASH_CASE(64)
    XO_FLASH_CASE(80)
    XO_FLASH_CASE(96)
    XO_FLASH_CASE(128)
#undef XO_FLASH_CASE
    default:
      TORCH_CHECK(false, kOp, "unreachable head dim ", D);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace xray_ops
