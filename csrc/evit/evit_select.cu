// EViT token reorganization (xray_ops.evit_select), forward and backward, CUDA.
//
// Ranking: the patch tokens in stable descending order of cls_attn, NaN first (what a stable
// descending torch.sort gives). Comparisons are done in float: the float16/bfloat16 -> float
// conversion is exact and order-preserving, so ties are the same ties as in the input dtype.
//
// Forward: grid (B, channel blocks of kBlockC). A block ranks its row once in shared memory
// (P^2 / 256 comparisons per thread), then each warp copies rows [CLS, kept...] for its channel
// slice and accumulates its share of the dropped rows into the fused token; the warps' partial
// sums are reduced in shared memory in a fixed order (deterministic).
//
// Backward: grid (B, token blocks of kWarps). A warp owns one patch token: it ranks it
// (a warp-wide count), then writes its gradient row, and for a dropped token reduces
// <x_j, grad_fused> over the channels for grad_cls.
#include "common.h"
#include "evit/evit_select.h"

namespace xray_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockC = 256;  // channels per forward block
// A register budget of 64 per thread (at least 4 blocks of 256 threads per SM): left to itself
// ptxas 13 aims for full occupancy with 32-40 registers and spills (8-28 B per thread in the
// forward; tests/test_cuda_resources.py checks the built binary).
constexpr int kMinBlocks = 4;

// Does token i come before token j in the stable descending order (NaN above numbers)?
__device__ __forceinline__ bool precedes(float ai, int i, float aj, int j) {
  const bool nan_i = isnan(ai), nan_j = isnan(aj);
  if (nan_i != nan_j) return nan_i;
  if (nan_i) return i < j;
  return ai > aj || (ai == aj && i < j);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    evit_select_fwd_kernel(const T* __restrict__ x,   // (B, N, C), strides sx*
                           const T* __restrict__ a,   // (B, P), strides sa*
                           T* __restrict__ out,       // (B, 1 + keep + fuse, C), contiguous
                           int64_t* __restrict__ idx, // (B, keep)
                           int P, int C, int keep, bool fuse, int64_t sxb, int64_t sxn,
                           int64_t sxc, int64_t sab, int64_t sap) {
  extern __shared__ float smem[];
  float* s_a = smem;                                      // [P] the row, as float
  int* s_order = reinterpret_cast<int*>(s_a + P);         // [P] token at each rank
  float* s_part = reinterpret_cast<float*>(s_order + P);  // [kWarps][32 * VEC] partial sums
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* xb = x + b * sxb;
  const T* ab = a + b * sab;
  const int n_out = 1 + keep + (fuse ? 1 : 0);
  T* ob = out + b * n_out * (int64_t)C;

  for (int j = tid; j < P; j += kThreads) s_a[j] = static_cast<float>(ab[j * sap]);
  __syncthreads();
  for (int j = tid; j < P; j += kThreads) {
    const float aj = s_a[j];
    int r = 0;
    for (int i = 0; i < P; ++i) r += precedes(s_a[i], i, aj, j);  // s_a[i]: a broadcast read
    s_order[r] = j;
  }
  __syncthreads();
  if (blockIdx.y == 0)
    for (int s = tid; s < keep; s += kThreads) idx[b * keep + s] = s_order[s];

  const int c_begin = blockIdx.y * kBlockC;
  const int c_end = min(C, c_begin + kBlockC);
  for (int cc = c_begin; cc < c_end; cc += 32 * VEC) {
    const int c = cc + lane * VEC;
    const bool active = c < c_end;  // on the vector path C % VEC == 0: whole packs
    // rows 0..keep of the output: CLS then the kept tokens in rank order
    for (int s = warp; s < 1 + keep; s += kWarps) {
      const int src = s == 0 ? 0 : 1 + s_order[s - 1];
      if (active) copy_pack<T, VEC>(ob + (int64_t)s * C + c, xb + src * sxn + c * sxc);
    }
    if (fuse) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      for (int s = keep + warp; s < P; s += kWarps) {
        const int j = s_order[s];
        const float w = s_a[j];
        if (active) {
          float v[VEC];
          load_pack<T, VEC>(xb + (1 + j) * sxn + c * sxc, v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += w * v[k];
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s_part[warp * 32 * VEC + lane * VEC + k] = acc[k];
      __syncthreads();
      if (warp == 0 && active) {
        float sum[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sum[k] = 0.f;
          for (int w = 0; w < kWarps; ++w) sum[k] += s_part[w * 32 * VEC + lane * VEC + k];
        }
        store_pack<T, VEC>(ob + (int64_t)(1 + keep) * C + c, sum);
      }
      __syncthreads();  // s_part is reused by the next channel chunk
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    evit_select_bwd_kernel(const T* __restrict__ go,  // (B, 1 + keep + fuse, C), strides sg*
                           const T* __restrict__ x,   // (B, N, C), strides sx*
                           const T* __restrict__ a,   // (B, P), strides sa*
                           T* __restrict__ gx,        // (B, N, C), contiguous
                           T* __restrict__ ga,        // (B, P), contiguous
                           int P, int C, int keep, bool fuse, int64_t sgb, int64_t sgn,
                           int64_t sgc, int64_t sxb, int64_t sxn, int64_t sxc, int64_t sab,
                           int64_t sap) {
  extern __shared__ float s_a[];  // [P]
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* gob = go + b * sgb;
  const T* xb = x + b * sxb;
  const T* ab = a + b * sab;
  T* gxb = gx + b * (int64_t)(P + 1) * C;
  for (int j = tid; j < P; j += kThreads) s_a[j] = static_cast<float>(ab[j * sap]);
  __syncthreads();

  if (blockIdx.y == 0)  // the CLS token's gradient passes through
    for (int c = tid * VEC; c < C; c += kThreads * VEC)
      copy_pack<T, VEC>(gxb + c, gob + c * sgc);

  const int j = blockIdx.y * kWarps + warp;
  if (j >= P) return;
  const float aj = s_a[j];
  int r = 0;
  for (int i = lane; i < P; i += 32) r += precedes(s_a[i], i, aj, j);
  r = warp_sum_int(r);
  T* row = gxb + (int64_t)(1 + j) * C;
  if (r < keep) {
    for (int c = lane * VEC; c < C; c += 32 * VEC)
      copy_pack<T, VEC>(row + c, gob + (1 + r) * sgn + c * sgc);
    if (lane == 0) ga[b * P + j] = static_cast<T>(0.f);
  } else if (fuse) {
    float dot = 0.f;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
      float g[VEC], v[VEC], o[VEC];
      load_pack<T, VEC>(gob + (1 + keep) * sgn + c * sgc, g);
      load_pack<T, VEC>(xb + (1 + j) * sxn + c * sxc, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = aj * g[k];
        dot += v[k] * g[k];
      }
      store_pack<T, VEC>(row + c, o);
    }
    dot = warp_sum(dot);
    if (lane == 0) ga[b * P + j] = static_cast<T>(dot);
  } else {
    float zero[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) zero[k] = 0.f;
    for (int c = lane * VEC; c < C; c += 32 * VEC) store_pack<T, VEC>(row + c, zero);
    if (lane == 0) ga[b * P + j] = static_cast<T>(0.f);
  }
}

// Largest VEC (16 bytes) usable for these tensors: unit channel stride, whole packs per row,
// and every row start aligned.
template <typename T>
int vector_width(int64_t C, std::initializer_list<std::pair<const at::Tensor*, int>> ts) {
  constexpr int V = 16 / sizeof(T);
  if (C % V != 0) return 1;
  for (auto [t, dims] : ts) {
    if (!aligned_to(t->data_ptr(), 16)) return 1;
    if (t->stride(dims - 1) != 1) return 1;
    for (int d = 0; d < dims - 1; ++d)
      if (t->size(d) > 1 && t->stride(d) % V != 0) return 1;
  }
  return V;
}

size_t smem_bytes(size_t bytes, const void* kernel) {
  if (bytes > 48 * 1024) {  // opt in to more than the default 48 KB of dynamic shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  return bytes;
}

void check_inputs(const at::Tensor& x, const at::Tensor& cls_attn, int64_t keep) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_CUDA(cls_attn, "cls_attn");
  XO_CHECK_DIM(x, 3, "x");
  XO_CHECK_DIM(cls_attn, 2, "cls_attn");
  XO_CHECK_SAME_DTYPE(x, cls_attn, "cls_attn");
  TORCH_CHECK(x.size(1) >= 2, "x: expected at least 2 tokens, got shape ", x.sizes());
  TORCH_CHECK(cls_attn.size(0) == x.size(0) && cls_attn.size(1) == x.size(1) - 1,
              "cls_attn: expected shape (", x.size(0), ", ", x.size(1) - 1, "), got ",
              cls_attn.sizes());
  TORCH_CHECK(keep >= 1 && keep <= x.size(1) - 1, "keep: expected an int in [1, ",
              x.size(1) - 1, "], got ", keep);
  TORCH_CHECK(x.size(1) - 1 <= 8192, "x: at most 8192 patch tokens, got ", x.size(1) - 1);
  TORCH_CHECK(x.size(2) < (int64_t(1) << 31), "x: too many channels");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> evit_select_forward(const at::Tensor& x,
                                                       const at::Tensor& cls_attn, int64_t keep,
                                                       bool fuse) {
  check_inputs(x, cls_attn, keep);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), P = N - 1;
  auto out = at::empty({B, 1 + keep + (fuse ? 1 : 0), C}, x.options());
  auto idx = at::empty({B, keep}, x.options().dtype(at::kLong));
  if (B == 0) return {out, idx};
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(B, std::max<int64_t>(1, (C + kBlockC - 1) / kBlockC));
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "evit_select_forward", [&] {
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      auto kernel = evit_select_fwd_kernel<scalar_t, VEC>;
      const size_t smem = smem_bytes(P * (sizeof(float) + sizeof(int)) +
                                         kWarps * 32 * VEC * sizeof(float),
                                     reinterpret_cast<const void*>(kernel));
      kernel<<<grid, kThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), cls_attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          idx.data_ptr<int64_t>(), P, C, keep, fuse, x.stride(0), x.stride(1), x.stride(2),
          cls_attn.stride(0), cls_attn.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_width<scalar_t>(C, {{&x, 3}, {&out, 3}}) > 1)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return {out, idx};
}

std::tuple<at::Tensor, at::Tensor> evit_select_backward(const at::Tensor& grad_out,
                                                        const at::Tensor& x,
                                                        const at::Tensor& cls_attn, int64_t keep,
                                                        bool fuse) {
  check_inputs(x, cls_attn, keep);
  XO_CHECK_CUDA(grad_out, "grad_out");
  XO_CHECK_DIM(grad_out, 3, "grad_out");
  XO_CHECK_SAME_DTYPE(x, grad_out, "grad_out");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), P = N - 1;
  TORCH_CHECK(grad_out.size(0) == B && grad_out.size(1) == 1 + keep + (fuse ? 1 : 0) &&
                  grad_out.size(2) == C,
              "grad_out: expected shape (", B, ", ", 1 + keep + (fuse ? 1 : 0), ", ", C,
              "), got ", grad_out.sizes());
  const at::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty({B, N, C}, x.options());
  auto ga = at::empty({B, P}, cls_attn.options());
  if (B == 0) return {gx, ga};
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(B, (P + kWarps - 1) / kWarps);
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "evit_select_backward", [&] {
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      auto kernel = evit_select_bwd_kernel<scalar_t, VEC>;
      const size_t smem = smem_bytes(P * sizeof(float), reinterpret_cast<const void*>(kernel));
      kernel<<<grid, kThreads, smem, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), cls_attn.data_ptr<scalar_t>(),
          gx.data_ptr<scalar_t>(), ga.data_ptr<scalar_t>(), P, C, keep, fuse,
          grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), x.stride(0), x.stride(1),
          x.stride(2), cls_attn.stride(0), cls_attn.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_width<scalar_t>(C, {{&grad_out, 3}, {&x, 3}, {&gx, 3}}) > 1)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return {gx, ga};
}

}  // namespace xray_ops
