// ToMe bipartite soft matching (xray_ops.tome_match), CUDA.
//
// Four kernels, all parallel over (batch, token blocks); the (Na, Nb) score matrix never
// reaches global memory:
//   normalize: a warp per token, as the definition normalises (xray_ops.reference.tome
//           .tome_normalize): scaled by a power of two that brings its largest |value| into
//           [1, 2) (exact), then divided by its norm (IEEE), so no square underflows or
//           overflows at any finite magnitude. Writes the unit rows (B, N, D) in float32.
//   scores: a block owns 64 A tokens (even positions) and walks the B tokens (odd positions) in
//           tiles of 64, D in chunks of 16 through shared memory, 4x4 dot products per thread
//           (fp32 FMA) of unit rows: the cosine. NaN counts as +inf (larger than every number,
//           as torch.max); the CLS row / distillation column are -inf. A running row max keeps
//           the first (lowest) index among equal maxima.
//   rank:   each A token's place in the stable descending order of its best score.
//   plan:   with every rank known, each token finds its output slot and its place in the CSR
//           slot_src / slot_start by counting over the A tokens (no sort, no atomics).
// Everything is computed in float32 (metrics in float16 / bfloat16 / float32); the norms and the
// cross-lane reductions use fixed orders, so two runs give the same matching.
#include <cmath>
#include <limits>

#include "common.h"
#include "tome/tome.h"

namespace xray_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;   // A tokens per block, B tokens per tile
constexpr int kTileD = 16;  // metric channels per shared-memory chunk
constexpr int kChunk = 1024;  // tokens staged in shared memory by the rank / plan kernels

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// 2**k bringing amax into [1, 2), k clamped to the normal exponents [-126, 127], from the
// bits: amax = 1.f * 2**(E - 127) gives k = 127 - E (zero / subnormal: E = 0, k = 127;
// Inf / NaN: E = 255, k = -126). See xray_ops.reference.tome.power_of_two_scale.
__device__ __forceinline__ float power_of_two_scale(float amax) {
  const int e = (__float_as_int(amax) >> 23) & 0xff;
  const int k = min(max(127 - e, -126), 127);
  return __int_as_float((k + 127) << 23);
}

// A warp per token: u[t] = m[t]·2**k / |m[t]·2**k|, lanes strided over D, butterfly sums
// (a fixed order). A zero row gives 0 / 0 = NaN, as in the definition. The extension is built
// with --use_fast_math, which flushes float32 subnormals to zero: a metric value below
// 1.2e-38 in magnitude counts as 0 here (every normal magnitude is exact).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tome_normalize_kernel(const T* __restrict__ m,  // (B, N, D), strides sm*
                          float* __restrict__ u,    // (B, N, D), contiguous
                          int N, int D, int64_t smb, int64_t smn, int64_t smd) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.y * kWarps + (threadIdx.x >> 5);
  if (t >= N) return;  // a whole warp leaves together: the shuffles below stay converged
  const int64_t b = blockIdx.x;
  const T* row = m + b * smb + (int64_t)t * smn;
  float* out = u + (b * N + t) * (int64_t)D;
  float amax = 0.f;
  for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(to_f(row[(int64_t)d * smd])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = power_of_two_scale(amax);
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = to_f(row[(int64_t)d * smd]) * scale;  // exact: a power of two
    ss = fmaf(v, v, ss);
  }
  const float norm = __fsqrt_rn(warp_sum(ss));
  for (int d = lane; d < D; d += 32)
    out[d] = __fdiv_rn(to_f(row[(int64_t)d * smd]) * scale, norm);
}

// (v, i) is better than (bv, bi): larger, or equal with a lower index
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__global__ void __launch_bounds__(kThreads)
    tome_scores_kernel(const float* __restrict__ u,      // (B, N, D) unit rows, contiguous
                       float* __restrict__ node_max,     // (B, Na)
                       int32_t* __restrict__ node_idx,   // (B, Na)
                       int N, int Na, int Nb, int D, bool class_token, bool distill_token) {
  __shared__ float s_a[kTileD][kTile + 1];
  __shared__ float s_b[kTileD][kTile + 1];
  const int64_t b = blockIdx.x;
  const int a0 = blockIdx.y * kTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const float* ub = u + b * N * (int64_t)D;

  float best[4];
  int best_idx[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    best[k] = -INFINITY;
    best_idx[k] = 0;
  }
  for (int b0 = 0; b0 < Nb; b0 += kTile) {
    float acc[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[k][l] = 0.f;
    for (int d0 = 0; d0 < D; d0 += kTileD) {
      __syncthreads();
      for (int e = tid; e < kTile * kTileD; e += kThreads) {
        const int row = e / kTileD, d = d0 + e % kTileD;
        const int ia = a0 + row, jb = b0 + row;
        s_a[e % kTileD][row] = (ia < Na && d < D) ? ub[(int64_t)(2 * ia) * D + d] : 0.f;
        s_b[e % kTileD][row] = (jb < Nb && d < D) ? ub[(int64_t)(2 * jb + 1) * D + d] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kTileD; ++d) {
        float av[4], bv[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) av[k] = s_a[d][ty + 16 * k];
#pragma unroll
        for (int l = 0; l < 4; ++l) bv[l] = s_b[d][tx + 16 * l];
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
          for (int l = 0; l < 4; ++l) acc[k][l] = fmaf(av[k], bv[l], acc[k][l]);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int il = ty + 16 * k, i = a0 + il;
      float tb = 0.f;
      int ti = 0;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int jl = tx + 16 * l, j = b0 + jl;
        float s = acc[k][l];  // the cosine of two unit rows
        if (isnan(s)) s = INFINITY;  // NaN ranks above every number
        if ((class_token && i == 0) || (distill_token && j == 0) || j >= Nb) s = -INFINITY;
        if (l == 0 || s > tb) {  // columns ascend with l: strictly greater keeps the first
          tb = s;
          ti = j;
        }
      }
      // the 16 lanes of a half-warp share this row: reduce in a fixed butterfly order
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, tb, off);
        const int oi = __shfl_xor_sync(0xffffffffu, ti, off);
        if (better(ov, oi, tb, ti)) {
          tb = ov;
          ti = oi;
        }
      }
      if (tb > best[k]) {  // a later tile wins only with a strictly larger score
        best[k] = tb;
        best_idx[k] = ti;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int i = a0 + ty + 16 * k;
      if (i < Na) {
        node_max[b * Na + i] = best[k];
        node_idx[b * Na + i] = best_idx[k];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    tome_rank_kernel(const float* __restrict__ node_max,  // (B, Na), NaN already +inf
                     int32_t* __restrict__ rank,          // (B, Na)
                     int Na) {
  __shared__ float s_key[kChunk];
  const int64_t b = blockIdx.x;
  const int i = blockIdx.y * kThreads + threadIdx.x;
  const float* row = node_max + b * Na;
  const float ki = i < Na ? row[i] : 0.f;
  int cnt = 0;
  for (int k0 = 0; k0 < Na; k0 += kChunk) {
    const int kn = min(kChunk, Na - k0);
    __syncthreads();
    for (int k = threadIdx.x; k < kn; k += kThreads) s_key[k] = row[k0 + k];
    __syncthreads();
    for (int k = 0; k < kn; ++k) {  // s_key[k]: a broadcast read
      const float kk = s_key[k];
      cnt += (kk > ki) || (kk == ki && k0 + k < i);
    }
  }
  if (i < Na) rank[b * Na + i] = cnt;
}

// A thread owns A token i = t and B token j = t.
__global__ void __launch_bounds__(kThreads)
    tome_plan_kernel(const int32_t* __restrict__ rank,  // (B, Na)
                     const int32_t* __restrict__ nidx,  // (B, Na) best B token of each A token
                     int64_t* __restrict__ unm,         // (B, Na - r)
                     int64_t* __restrict__ src,         // (B, r)
                     int64_t* __restrict__ dst,         // (B, r)
                     int64_t* __restrict__ dest,        // (B, N)
                     int64_t* __restrict__ slot_src,    // (B, N)
                     int64_t* __restrict__ slot_start,  // (B, N - r + 1)
                     int N, int Na, int Nb, int r, bool class_token, bool distill_token) {
  __shared__ int s_rank[kChunk];
  __shared__ int s_d[kChunk];
  const int64_t b = blockIdx.x;
  const int t = blockIdx.y * kThreads + threadIdx.x;
  const int U = Na - r, n_out = N - r;
  const bool vi = t < Na, vj = t < Nb;
  const int rank_i = vi ? rank[b * Na + t] : 0;
  const int d_i = vi ? nidx[b * Na + t] : 0;
  const bool merged_i = vi && rank_i < r;
  int stay_before = 0, lower_i = 0, same_before = 0, lower_j = 0, into_b0 = 0;
  for (int k0 = 0; k0 < Na; k0 += kChunk) {
    const int kn = min(kChunk, Na - k0);
    __syncthreads();
    for (int k = threadIdx.x; k < kn; k += kThreads) {
      s_rank[k] = rank[b * Na + k0 + k];
      s_d[k] = nidx[b * Na + k0 + k];
    }
    __syncthreads();
    for (int k = 0; k < kn; ++k) {
      const int kidx = k0 + k, dk = s_d[k];
      if (s_rank[k] < r) {  // token k merges into B token dk
        lower_i += dk < d_i;
        same_before += dk == d_i && kidx < t;
        lower_j += dk < t;
        into_b0 += dk == 0;
      } else {
        stay_before += kidx < t;
      }
    }
  }
  // ToMe's order: [staying A (ascending with class_token, else by rank), B tokens]; with
  // distill_token B[0] takes slot 1. A slot's group: its own token, then merged A tokens.
  const int u = class_token ? stay_before : rank_i - r;
  int slot_u, start_u, slot_d, slot_j;
  if (distill_token) {
    slot_u = u >= 1 ? u + 1 : u;
    start_u = u >= 1 ? slot_u + into_b0 : slot_u;
    slot_d = d_i == 0 ? 1 : U + d_i;
    slot_j = t == 0 ? 1 : U + t;
  } else {
    slot_u = start_u = u;
    slot_d = U + d_i;
    slot_j = U + t;
  }
  int64_t* dest_b = dest + b * N;
  int64_t* src_b = slot_src + b * N;
  int64_t* start_b = slot_start + b * (n_out + 1);
  if (vi) {
    if (merged_i) {
      dest_b[2 * t] = slot_d;
      src_b[slot_d + lower_i + 1 + same_before] = 2 * t;
      src[b * r + rank_i] = t;
      dst[b * r + rank_i] = d_i;
    } else {
      dest_b[2 * t] = slot_u;
      src_b[start_u] = 2 * t;
      start_b[slot_u] = start_u;
      unm[b * U + u] = t;
    }
  }
  if (vj) {
    const int start_j = slot_j + lower_j;
    dest_b[2 * t + 1] = slot_j;
    src_b[start_j] = 2 * t + 1;
    start_b[slot_j] = start_j;
  }
  if (t == 0) start_b[n_out] = N;
}

}  // namespace

std::vector<at::Tensor> tome_match(const at::Tensor& metric, int64_t r, bool class_token,
                                   bool distill_token) {
  XO_CHECK_CUDA(metric, "metric");
  XO_CHECK_DIM(metric, 3, "metric");
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  const int64_t protected_tokens = (class_token ? 1 : 0) + (distill_token ? 1 : 0);
  TORCH_CHECK(D >= 1, "metric: expected at least 1 channel, got shape ", metric.sizes());
  TORCH_CHECK(N < (int64_t(1) << 30) && D < (int64_t(1) << 31), "metric: too large, shape ",
              metric.sizes());
  TORCH_CHECK(r >= 1 && r <= (N - protected_tokens) / 2, "r: expected an int in [1, ",
              (N - protected_tokens) / 2, "] (clamped by the caller), got ", r);
  const at::cuda::CUDAGuard guard(metric.device());
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  auto i64 = metric.options().dtype(at::kLong);
  auto unm = at::empty({B, Na - r}, i64);
  auto src = at::empty({B, r}, i64);
  auto dst = at::empty({B, r}, i64);
  auto dest = at::empty({B, N}, i64);
  auto slot_src = at::empty({B, N}, i64);
  auto slot_start = at::empty({B, N - r + 1}, i64);
  if (B == 0) return {unm, src, dst, dest, slot_src, slot_start};
  auto unit = at::empty({B, N, D}, metric.options().dtype(at::kFloat));
  auto node_max = at::empty({B, Na}, metric.options().dtype(at::kFloat));
  auto node_idx = at::empty({B, Na}, metric.options().dtype(at::kInt));
  auto rank = at::empty({B, Na}, metric.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  XO_DISPATCH_HALF_BF16_FLOAT(metric.scalar_type(), "tome_match", [&] {
    tome_normalize_kernel<scalar_t><<<dim3(B, (N + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        metric.data_ptr<scalar_t>(), unit.data_ptr<float>(), N, D, metric.stride(0),
        metric.stride(1), metric.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  tome_scores_kernel<<<dim3(B, (Na + kTile - 1) / kTile), kThreads, 0, stream>>>(
      unit.data_ptr<float>(), node_max.data_ptr<float>(), node_idx.data_ptr<int32_t>(), N, Na, Nb,
      D, class_token, distill_token);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(B, (Na + kThreads - 1) / kThreads);
  tome_rank_kernel<<<grid, kThreads, 0, stream>>>(node_max.data_ptr<float>(),
                                                  rank.data_ptr<int32_t>(), Na);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tome_plan_kernel<<<grid, kThreads, 0, stream>>>(
      rank.data_ptr<int32_t>(), node_idx.data_ptr<int32_t>(), unm.data_ptr<int64_t>(),
      src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), dest.data_ptr<int64_t>(),
      slot_src.data_ptr<int64_t>(), slot_start.data_ptr<int64_t>(), N, Na, Nb, r, class_token,
      distill_token);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {unm, src, dst, dest, slot_src, slot_start};
}

}  // namespace xray_ops
