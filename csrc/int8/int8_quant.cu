// Per-token int8 quantization, CUDA: quantize_per_token and layernorm_quant.
//
// One block per row. The row is loaded once into registers (NP packs of VEC elements per
// thread, 16-byte loads when the row is aligned), reduced (LayerNorm statistics, then the
// absmax), quantized from registers and written as int8 packs, with its float32 scale.
//
// Rounding follows the definition (xray_ops/reference/int8.py): scale = absmax / 127 and
// x / scale are correctly rounded divisions (__fdiv_rn: the build uses --use_fast_math, whose
// '/' is approximate), then round half to even (__float2int_rn).
#include "common.h"
#include "int8/int8.h"

namespace xray_ops {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxRow = 8192;  // elements per row kept in registers (the dispatcher's limit)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions for up to kMaxThreads threads; every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (n_warps == 1) return v;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  // 0 is the identity of both reductions here (sums, and maxima of absolute values)
  const float r = lane < n_warps ? smem[lane] : 0.f;
  return kMax ? warp_max(r) : warp_sum(r);
}

// scale of a row: absmax / 127 (IEEE), 1 for an all-zero row, NaN for a row holding NaN
__device__ __forceinline__ float row_scale(float absmax, bool has_nan) {
  float s = __fdiv_rn(absmax, 127.f);
  if (s == 0.f) s = 1.f;
  return has_nan ? __int_as_float(0x7fc00000) : s;
}

__device__ __forceinline__ int8_t quantize_value(float v, float scale) {
  float r = __fdiv_rn(v, scale);
  if (isnan(r)) r = 0.f;  // a NaN row, or Inf / Inf
  r = fminf(fmaxf(r, -127.f), 127.f);
  return static_cast<int8_t>(__float2int_rn(r));  // round half to even
}


// Row `row` of x in registers: v[p][e] = x[row, (tid + p * blockDim) * VEC + e], 0 past K.
template <typename T, int VEC, int NP>
__device__ __forceinline__ void load_row(const T* xr, int K, float (&v)[NP][VEC]) {
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (threadIdx.x + p * blockDim.x) * VEC;
    if (c < K) {  // K % VEC == 0 on the vector path: whole packs
      load_pack<T, VEC>(xr + c, v[p]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[p][e] = 0.f;
    }
  }
}

template <int VEC, int NP>
__device__ __forceinline__ void quantize_row(const float (&v)[NP][VEC], int K, bool valid_nan,
                                             float* smem, int8_t* qr, float* scale_out) {
  float amax = 0.f;
  float nan = 0.f;
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      amax = fmaxf(amax, fabsf(v[p][e]));  // fmaxf drops a NaN operand
      nan += isnan(v[p][e]) ? 1.f : 0.f;
    }
  amax = block_reduce<true>(amax, smem);
  nan = block_reduce<false>(nan, smem);
  const float scale = row_scale(amax, nan > 0.f || !valid_nan);
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (threadIdx.x + p * blockDim.x) * VEC;
    if (c < K) {
      Pack<int8_t, VEC> pk;  // VEC bytes, one store (aligned: K % VEC == 0 on this path)
#pragma unroll
      for (int e = 0; e < VEC; ++e) pk.v[e] = quantize_value(v[p][e], scale);
      *reinterpret_cast<Pack<int8_t, VEC>*>(qr + c) = pk;
    }
  }
  if (threadIdx.x == 0) *scale_out = scale;
}

template <typename T, int VEC, int NP>
__global__ void __launch_bounds__(kMaxThreads)
    quantize_rows_kernel(const T* __restrict__ x,  // (M, K), row stride `stride_row`
                         int8_t* __restrict__ q,   // (M, K), contiguous
                         float* __restrict__ scale,  // (M,)
                         int K, int64_t stride_row) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  float v[NP][VEC];
  load_row<T, VEC, NP>(x + row * stride_row, K, v);
  quantize_row<VEC, NP>(v, K, true, smem, q + row * K, scale + row);
}

// min blocks 1: the whole register file is the budget. Left to itself ptxas 13 trades
// registers for occupancy and spills (4 B per thread for float rows of 16 values on sm_80),
// though the row (NP x VEC floats per thread) is meant to stay in registers.
template <typename T, int VEC, int NP>
__global__ void __launch_bounds__(kMaxThreads, 1)
    layernorm_quant_kernel(const T* __restrict__ x,  // (M, C), row stride `stride_row`
                           const float* __restrict__ w,  // (C,) or nullptr
                           const float* __restrict__ b,  // (C,) or nullptr
                           int8_t* __restrict__ q,       // (M, C), contiguous
                           float* __restrict__ scale,    // (M,)
                           int C, int64_t stride_row, float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  float v[NP][VEC];
  load_row<T, VEC, NP>(x + row * stride_row, C, v);
  // statistics in float32: the mean, then the centred second moment (not E[x²] - mean²)
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum += v[p][e];
  const float mean = block_reduce<false>(sum, smem) / C;
  float sq = 0.f;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (threadIdx.x + p * blockDim.x) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = c + e < C ? v[p][e] - mean : 0.f;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_reduce<false>(sq, smem) / C + eps);
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = (threadIdx.x + p * blockDim.x) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float y = (v[p][e] - mean) * rstd;
      if (c + e < C) {
        if (w != nullptr) y *= w[c + e];
        if (b != nullptr) y += b[c + e];
      } else {
        y = 0.f;
      }
      v[p][e] = y;
    }
  }
  // a non-finite row (NaN / Inf in x) has a NaN mean or rstd: its scale is NaN, its q 0
  const bool finite = isfinite(mean) && isfinite(rstd);
  quantize_row<VEC, NP>(v, C, finite, smem, q + row * C, scale + row);
}

struct LaunchShape {
  int vec, np, threads;
};

// The widest 16-byte packs the rows allow, then threads and packs per thread to cover a row.
LaunchShape launch_shape(const at::Tensor& x, int64_t K) {
  const int full = 16 / static_cast<int>(x.element_size());
  const bool aligned = aligned_to(x.data_ptr(), 16) && (x.size(0) <= 1 || x.stride(0) % full == 0);
  const int vec = (K % full == 0 && aligned) ? full : 1;
  const int64_t packs = (K + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < packs) threads *= 2;
  int np = 1;
  while (static_cast<int64_t>(np) * threads < packs) np *= 2;
  return {vec, np, threads};
}

// Runtime (VEC, NP) -> template instantiation; only the shapes a row of at most kMaxRow
// elements can need are compiled (larger NP x VEC would only spill registers).
template <typename T, typename F>
void dispatch_shape(const LaunchShape& s, F&& f) {
  constexpr int V = 16 / sizeof(T);
  auto with_np = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    auto call = [&](auto np_tag) {
      constexpr int NP = decltype(np_tag)::value;
      if constexpr (NP * VEC * kMaxThreads <= kMaxRow) {
        f(std::integral_constant<int, VEC>{}, np_tag);
      } else {
        TORCH_CHECK(false, "int8 row kernels: rows longer than ", kMaxRow, " elements");
      }
    };
    switch (s.np) {
      case 1: return call(std::integral_constant<int, 1>{});
      case 2: return call(std::integral_constant<int, 2>{});
      case 4: return call(std::integral_constant<int, 4>{});
      case 8: return call(std::integral_constant<int, 8>{});
      case 16: return call(std::integral_constant<int, 16>{});
      case 32: return call(std::integral_constant<int, 32>{});
      default: TORCH_CHECK(false, "int8 row kernels: rows longer than ", kMaxRow, " elements");
    }
  };
  if (s.vec == V)
    with_np(std::integral_constant<int, V>{});
  else
    with_np(std::integral_constant<int, 1>{});
}

void check_rows(const at::Tensor& x, const char* name) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 2, "x");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxRow, name, ": x: expected 1 <= K <= ", kMaxRow,
              ", got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, name, ": x: expected unit stride along K, got ",
              x.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> int8_quantize_per_token(const at::Tensor& x) {
  check_rows(x, "int8_quantize_per_token");
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto s = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  auto stream = at::cuda::getCurrentCUDAStream();
  const LaunchShape shape = launch_shape(x, K);
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "int8_quantize_per_token", [&] {
    dispatch_shape<scalar_t>(shape, [&](auto vec_tag, auto np_tag) {
      constexpr int VEC = decltype(vec_tag)::value, NP = decltype(np_tag)::value;
      quantize_rows_kernel<scalar_t, VEC, NP><<<M, shape.threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), K, x.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> int8_layernorm_quant(const at::Tensor& x,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias,
                                                        double eps) {
  check_rows(x, "int8_layernorm_quant");
  const int64_t M = x.size(0), C = x.size(1);
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value()) {
      const at::Tensor& p = t->value();
      XO_CHECK_CUDA(p, "weight/bias");
      TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 1 &&
                      p.size(0) == C,
                  "int8_layernorm_quant: weight/bias: expected contiguous float32 (", C,
                  ",), got ", p.scalar_type(), " ", p.sizes());
    }
  }
  const at::cuda::CUDAGuard guard(x.device());
  auto q = at::empty({M, C}, x.options().dtype(at::kChar));
  auto s = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, s};
  auto stream = at::cuda::getCurrentCUDAStream();
  const LaunchShape shape = launch_shape(x, C);
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "int8_layernorm_quant", [&] {
    dispatch_shape<scalar_t>(shape, [&](auto vec_tag, auto np_tag) {
      constexpr int VEC = decltype(vec_tag)::value, NP = decltype(np_tag)::value;
      layernorm_quant_kernel<scalar_t, VEC, NP><<<M, shape.threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), w, b, q.data_ptr<int8_t>(), s.data_ptr<float>(), C,
          x.stride(0), static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {q, s};
}

}  // namespace xray_ops
