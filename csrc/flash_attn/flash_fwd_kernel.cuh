// Flash attention forward (FlashAttention-2 structure) with tensor cores, for fp16 / bf16.
//
// One CTA = kBlockM (64) queries of one (batch, head); 4 warps, each owning 16 query rows.
// Grid: B * H * ceil(Nq / 64) CTAs, query blocks fastest so that CTAs running together share
// the K/V of one head in L2. 64-query tiles keep ViT lengths dense: 197 -> 4 tiles (77% of the
// rows used), 257 -> 5 (80%), 577 -> 10 (90%).
//
// Per CTA:
//   1. Q tile and key block 0 (K, V, bias) land in shared memory by cp.async (one group);
//      each warp moves its 16 x D slice of Q into registers with ldmatrix (A fragments), then
//      block 1 starts loading into the second buffer (which held Q).
//   2. For each key block of 64 (two buffers, block n + 2 loads while n + 1 waits and n
//      computes):  S = Q Kᵀ (mma m16n8k16, fp32);  logits in base 2:
//      s = S * scale * log2(e) + bias[j] * log2(e), masked (ragged tile, causal) to -inf;
//      online softmax per row (running max m, running sum l, in fp32 registers; the four
//      lanes of a quad share a row);  P = 2^(s - m) cast to the element type, reused in place
//      as the A operand;  O = O * 2^(m_old - m_new) + P V.
//   3. O / l is cast once, staged through shared memory and written with 16-byte stores;
//      lse = (m + log2 l) * ln 2 (natural log) per row.
//
// Conventions for rows without any finite logit (every key masked or a key bias of -inf
// everywhere): out = 0, lse = -inf (what flash-attn does). Nk = 0 is handled by the host.
//
// Layout formulas and the fragment tables they rely on: fragment_layout.h.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "flash_attn/flash_fwd_launch.h"
#include "flash_attn/fragment_layout.h"
#include "flash_attn/ptx.cuh"

namespace xray_ops {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One kBlockN x D tile into shared memory (pitch smem_pitch(D)). g: this thread's first
// element (row load_row(tid, 0, D), column load_col(tid, D)) of the tile's global rows,
// g_step = load_rows_per_step(D) * row stride; rows from `rows_valid` on are zero-filled
// (cp.async with src-size 0, given `safe`, an address inside the tensor, rather than the
// out-of-range row). s: this thread's first element in shared memory.
template <int D>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t g_step,
                                          int row0, int rows_valid, bool vec16,
                                          const uint16_t* safe) {
  constexpr int P = smem_pitch(D);
  constexpr int kRowsPerStep = load_rows_per_step(D);
#pragma unroll
  for (int i = 0; i < load_steps(D); ++i) {
    const bool valid = row0 + i * kRowsPerStep < rows_valid;
    uint16_t* dst = s + i * kRowsPerStep * P;
    if (vec16) {
      cp_async_16(smem_addr(dst), valid ? g : safe, valid);
    } else {  // rows not 16-byte aligned: plain 2-byte loads, one 16-byte shared store
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        w[e] = valid ? uint32_t(g[2 * e]) | (uint32_t(g[2 * e + 1]) << 16) : 0u;
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    g += g_step;
  }
}

// Per-thread state of the K/V/bias loads: this thread's place in a tile and the global
// pointers of key block 0; load(nb, ...) fetches key block nb into one buffer set.
template <int D>
struct KVLoader {
  const uint16_t* k;  // this thread's element of key row row0 in block 0
  const uint16_t* v;
  const uint16_t* k_safe;  // first element of this (batch, head): always inside the tensor
  const uint16_t* v_safe;
  const float* bias;  // key bias row of this batch, or nullptr
  int64_t k_row, v_row, bias_key;  // strides of one key
  int row0, smem_off, n_k, tid;
  bool active, vec16;

  __device__ __forceinline__ void load(int nb, uint16_t* sK, uint16_t* sV, float* sB) const {
    const int n_start = nb * kBlockN;
    const int rows = n_k - n_start;
    if (active) {
      load_tile<D>(sK + smem_off, k + n_start * k_row, load_rows_per_step(D) * k_row, row0,
                   rows, vec16, k_safe);
      load_tile<D>(sV + smem_off, v + n_start * v_row, load_rows_per_step(D) * v_row, row0,
                   rows, vec16, v_safe);
    }
    if (bias != nullptr && tid < kBlockN) {
      const bool valid = tid < rows;
      cp_async_4(smem_addr(sB + tid), bias + (valid ? (n_start + tid) * bias_key : 0), valid);
    }
  }
};

// CTAs per SM the register allocation must allow (65536 registers / (128 threads x this)):
// D = 32 in 128 registers (4 CTAs), D = 64, 80 in 168 (3 CTAs), 96 and 128 in 255 (2 CTAs).
// Tighter caps spill (checked with ptxas -v for sm_80 and sm_90a).
constexpr int min_ctas_per_sm(int d) { return d <= 32 ? 4 : d <= 80 ? 3 : 2; }

template <typename Elem, int D>
__global__ void __launch_bounds__(kNumThreads, min_ctas_per_sm(D))
    flash_fwd_kernel(const FwdParams p) {
  using Ops = ElemOps<Elem>;
  constexpr int P = smem_pitch(D);
  constexpr int kTile = kBlockN * P;     // elements of one K or V tile in shared memory
  constexpr int kTilesN = kBlockN / 8;   // 8-key accumulator tiles of S per warp
  constexpr int kTilesD = D / 8;         // 8-dim accumulator tiles of O per warp
  constexpr int kStepsD = D / 16;        // k-steps of S = Q Kᵀ
  constexpr int kStepsN = kBlockN / 16;  // k-steps of O = P V

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* const smem = reinterpret_cast<uint16_t*>(smem_raw);
  // [K0 | V0 | K1 | V1 | bias0 | bias1]; buffer set `buf` at K = smem + buf * 2 * kTile,
  // V = K + kTile, bias = sBias + buf * kBlockN (arithmetic, not a pointer array: a runtime
  // index into a local array would go to the stack)
  float* const sBias = reinterpret_cast<float*>(smem + 4 * kTile);
  uint16_t* const sQ = smem + 2 * kTile;  // Q passes through K buffer 1 before block 1 loads
  uint16_t* const sO = smem;              // the output is staged in K buffer 0 at the end

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bh = blockIdx.x / p.num_m_blocks;
  const int m_block = static_cast<int>(blockIdx.x % p.num_m_blocks);
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int m_start = m_block * kBlockM;
  // Causal: the last query of this block, m_start + 63, sees keys up to itself.
  const int n_end = p.causal ? min(p.n_k, m_start + kBlockM) : p.n_k;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;  // >= 1: n_k >= 1

  const float* bias = p.key_bias != nullptr ? p.key_bias + b * p.bias_stride_b : nullptr;

  // this thread's place in the tile loads (fragment_layout.h)
  const int row0 = load_row(tid, 0, D), col0 = load_col(tid, D);
  const bool load_active_ = load_active(tid, D);
  const int smem_off = row0 * P + col0;
  KVLoader<D> kv;
  kv.k_safe = p.k + b * p.k_stride_b + h * p.k_stride_h;
  kv.v_safe = p.v + b * p.v_stride_b + h * p.v_stride_h;
  kv.k = kv.k_safe + row0 * p.k_stride_n + col0;
  kv.v = kv.v_safe + row0 * p.v_stride_n + col0;
  kv.bias = bias;
  kv.k_row = p.k_stride_n;
  kv.v_row = p.v_stride_n;
  kv.bias_key = p.bias_stride_n;
  kv.row0 = row0;
  kv.smem_off = smem_off;
  kv.n_k = p.n_k;
  kv.tid = tid;
  kv.active = load_active_;
  kv.vec16 = p.vec16;

  // 1. Q and key block 0, then Q into registers, then block 1 over Q's buffer.
  if (load_active_) {
    const uint16_t* q_safe = p.q + b * p.q_stride_b + h * p.q_stride_h;
    load_tile<D>(sQ + smem_off, q_safe + (m_start + row0) * p.q_stride_n + col0,
                 load_rows_per_step(D) * p.q_stride_n, row0, p.n_q - m_start, p.vec16, q_safe);
  }
  kv.load(0, smem, smem + kTile, sBias);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[kStepsD][4];
#pragma unroll
  for (int kk = 0; kk < kStepsD; ++kk)
    ldmatrix_x4(qf[kk], smem_addr(sQ + (warp * 16 + ldsm_a_row(lane)) * P + kk * 16 +
                                  ldsm_a_col(lane)));
  __syncthreads();  // every warp has its Q before block 1 overwrites the buffer
  if (n_blocks > 1) kv.load(1, smem + 2 * kTile, smem + 3 * kTile, sBias + kBlockN);
  cp_async_commit();

  float o[kTilesD][4];
#pragma unroll
  for (int dt = 0; dt < kTilesD; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (base-2 units)
  float l_run[2] = {0.f, 0.f};              // this lane's share of the running sums

  // 2. Key blocks.
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb & 1;
    cp_async_wait<1>();  // block nb has landed (only block nb + 1 may still be in flight)
    __syncthreads();
    uint16_t* const Ks = smem + buf * 2 * kTile;
    uint16_t* const Vs = Ks + kTile;
    float* const Bs = sBias + buf * kBlockN;

    // S = Q Kᵀ for this warp's 16 rows x 64 keys
    float s[kTilesN][4];
#pragma unroll
    for (int jt = 0; jt < kTilesN; ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[jt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kStepsD; ++kk) {
#pragma unroll
      for (int jp = 0; jp < kTilesN / 2; ++jp) {
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(Ks + (jp * 16 + ldsm_b_row(lane)) * P + kk * 16 +
                                  ldsm_b_col(lane)));
        Ops::mma(s[2 * jp], qf[kk], kb[0], kb[1]);
        Ops::mma(s[2 * jp + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // logits in base 2, bias added, masked
    const int n_start = nb * kBlockN;
    const bool need_mask =
        n_start + kBlockN > p.n_k || (p.causal && n_start + kBlockN - 1 > m_start);
#pragma unroll
    for (int jt = 0; jt < kTilesN; ++jt) {
      float bias2[2] = {0.f, 0.f};
      if (bias != nullptr) {
        const float2 bb = *reinterpret_cast<const float2*>(Bs + jt * 8 + acc_col(lane, 0));
        bias2[0] = bb.x * kLog2e;
        bias2[1] = bb.y * kLog2e;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = fmaf(s[jt][e], p.scale_log2, bias2[e & 1]);
        if (need_mask) {
          const int i = m_start + warp * 16 + acc_row(lane, e);
          const int j = n_start + jt * 8 + acc_col(lane, e);
          if (masked(i, j, p.n_k, p.causal)) x = -INFINITY;
        }
        s[jt][e] = x;
      }
    }

    // online softmax; row r of this lane = accumulator elements 2r, 2r + 1
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int jt = 0; jt < kTilesN; ++jt) mx = fmaxf(mx, fmaxf(s[jt][2 * r], s[jt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // a row with no finite logit yet: subtract 0 instead of -inf (no inf - inf = NaN)
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2_approx(m_run[r] - m_use);  // 0 on the first finite block
      m_run[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int jt = 0; jt < kTilesN; ++jt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pv = exp2_approx(s[jt][2 * r + c] - m_use);
          s[jt][2 * r + c] = pv;
          sum += pv;
        }
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < kTilesD; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P's C fragments are the A fragments (fragment_layout.h)
#pragma unroll
    for (int kk = 0; kk < kStepsN; ++kk) {
      uint32_t pa[4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
        pa[r] = Ops::pack(s[p_tile(kk, r)][p_elem(r, 0)], s[p_tile(kk, r)][p_elem(r, 1)]);
#pragma unroll
      for (int dp = 0; dp < kTilesD / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(Vs + (kk * 16 + ldsm_a_row(lane)) * P + dp * 16 +
                                        ldsm_a_col(lane)));
        Ops::mma(o[2 * dp], pa, vb[0], vb[1]);
        Ops::mma(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }

    __syncthreads();  // every warp is done with buffer `buf`
    if (nb + 2 < n_blocks) kv.load(nb + 2, Ks, Vs, Bs);
    cp_async_commit();  // possibly empty: keeps one group per iteration for wait<1>
  }
  cp_async_wait<0>();

  // 3. Normalise, cast once, stage this warp's 16 rows in shared memory, store 16 bytes a lane.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // l == 0: no finite logit in the row -> out 0, lse -inf; a NaN l stays NaN in both
    inv_l[r] = l == 0.f ? 0.f : 1.f / l;
    const int i = m_start + warp * 16 + acc_row(lane, 2 * r);
    if ((lane & 3) == 0 && i < p.n_q)
      p.lse[bh * p.n_q + i] = l == 0.f ? -INFINITY : (m_run[r] + __log2f(l)) * kLn2;
  }
#pragma unroll
  for (int dt = 0; dt < kTilesD; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + acc_row(lane, 2 * r);
      const int col = dt * 8 + acc_col(lane, 2 * r);
      *reinterpret_cast<uint32_t*>(sO + row * P + col) =
          Ops::pack(o[dt][2 * r] * inv_l[r], o[dt][2 * r + 1] * inv_l[r]);
    }
  }
  __syncwarp();
  uint16_t* out = p.out + b * p.out_stride_b + h * p.out_stride_h + m_start * p.out_stride_n;
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int row = warp * 16 + c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    if (m_start + row < p.n_q)
      *reinterpret_cast<uint4*>(out + int64_t(row) * p.out_stride_n + col) =
          *reinterpret_cast<const uint4*>(sO + row * P + col);
  }
}

// Returns the error of the shared-memory opt-in (the launch itself is checked by the caller).
template <typename Elem, int D>
cudaError_t launch_flash_fwd(const FwdParams& params, int64_t grid, cudaStream_t stream) {
  auto kernel = flash_fwd_kernel<Elem, D>;
  constexpr size_t smem = flash_fwd_smem_bytes(D);
  if (smem > 48 * 1024) {  // opt in to more than the default 48 KB of dynamic shared memory
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), kNumThreads, smem, stream>>>(params);
  return cudaSuccess;
}

}  // namespace flash
}  // namespace xray_ops

// One explicit instantiation of run_flash_fwd per element type for head dim D (used by the
// flash_fwd_hdim*.cu files, one per head dim, so the build compiles them in parallel).
#define XO_FLASH_FWD_INSTANTIATE(D)                                                          \
  namespace xray_ops {                                                                       \
  namespace flash {                                                                          \
  template <>                                                                                \
  cudaError_t run_flash_fwd<ElemType::kHalf, D>(const FwdParams& p, int64_t grid,          \
                                                cudaStream_t s) {                            \
    return launch_flash_fwd<__half, D>(p, grid, s);                                          \
  }                                                                                          \
  template <>                                                                                \
  cudaError_t run_flash_fwd<ElemType::kBFloat16, D>(const FwdParams& p, int64_t grid,      \
                                                    cudaStream_t s) {                        \
    return launch_flash_fwd<__nv_bfloat16, D>(p, grid, s);                                   \
  }                                                                                          \
  }                                                                                          \
  }
