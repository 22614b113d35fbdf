// Kernel arguments of the flash attention forward and the launchers, one per (element type,
// head dim), instantiated in flash_fwd_hdim*.cu. Host-only header (no ATen, no device code),
// shared by the host API (flash_fwd_api.cpp) and the kernel files.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "flash_attn/fragment_layout.h"

namespace xray_ops {
namespace flash {

struct FwdParams {
  // Element pointers as raw 16-bit words: the loads copy bits, only the mma and the final
  // cast know the element type.
  const uint16_t* q;  // (B, H, Nq, D), strides q_stride_*, unit stride on D
  const uint16_t* k;  // (B, H, Nk, D), strides k_stride_*, unit stride on D
  const uint16_t* v;  // (B, H, Nk, D), strides v_stride_*, unit stride on D
  const float* key_bias;  // (B, Nk) float32, strides bias_stride_*; nullptr when absent
  uint16_t* out;      // (B, H, Nq, D), strides out_stride_*, unit stride on D (the host
                      // allocates (B, Nq, H, D) storage: a ViT's transpose + reshape is free)
  float* lse;         // (B, H, Nq), contiguous
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  int64_t bias_stride_b, bias_stride_n;
  int64_t out_stride_b, out_stride_h, out_stride_n;
  int heads;          // H
  int n_q;            // Nq >= 1
  int n_k;            // Nk >= 1
  int num_m_blocks;   // ceil(Nq / kBlockM); grid = B * H * num_m_blocks
  float scale_log2;   // softmax scale * log2(e): logits live in base-2 units in the kernel
  bool causal;        // query i sees keys 0..i (top-left aligned, torch SDPA's is_causal)
  bool vec16;         // q, k, v: 16-byte aligned rows -> cp.async; else scalar loads
};

enum class ElemType { kHalf, kBFloat16 };

// Launch the kernel for one (element type, head dim) on `stream` (grid = B * H * num_m_blocks
// CTAs). Returns the error of the shared-memory opt-in; check the launch itself afterwards.
// Specialised in flash_fwd_hdim<D>.cu, one file per head dim.
template <ElemType E, int D>
cudaError_t run_flash_fwd(const FwdParams& params, int64_t grid, cudaStream_t stream);

// Dynamic shared memory of the kernel for head dim D: K and V tiles double-buffered (Q is
// loaded through the second K buffer, the output is staged through the first), plus the key
// bias of both stages. D = 64: 37.4 KB; D = 128: 70.1 KB.
constexpr size_t flash_fwd_smem_bytes(int head_dim) {
  return 4 * size_t(kBlockN) * smem_pitch(head_dim) * sizeof(uint16_t) +
         2 * size_t(kBlockN) * sizeof(float);
}

}  // namespace flash
}  // namespace xray_ops
