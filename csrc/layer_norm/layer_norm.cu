// LayerNorm with a fused residual add and LayerScale, CUDA: forward and backward.
//
// Forward: one block per row, the row in registers (NP packs of VEC elements per thread, 16-byte
// loads when every row is aligned): s = residual + gamma * x, rounded to T and stored (the
// caller's residual stream), mean and the centred variance in float32, y = (s - mean) * rstd *
// weight + bias, one cast to T. x and residual are read once, y and s written once.
//
// Backward (rows up to kBwdMaxRow): a grid of blocks striding over the rows (each block keeps its columns' partial sums
// of d weight, d bias and d gamma in registers and writes them to its row of (grid, C) float32
// buffers that the caller sums: a fixed order, deterministic). Per row: the two row sums in one
// block reduction, then ds = rstd (dy w - mean(dy w) - xhat mean(dy w xhat)) + grad_s and
// dx = ds * gamma.
//
// Parameters (weight, bias, gamma) arrive as contiguous float32 (C,) vectors; rows need unit
// stride along C (any row stride, 0 for an expanded gradient).
#include "common.h"
#include "layer_norm/layer_norm.h"

namespace xray_ops {
namespace {

constexpr int kMaxThreads = 256;
// elements of a row kept in registers (the dispatcher's limits): the backward holds about seven
// row tiles per thread and spills past 16 elements a thread at sm_90, so its rows stop at 4096
constexpr int kMaxRow = 8192;
constexpr int kBwdMaxRow = 4096;
// Rows not in 16-byte packs (VEC 1) cost more registers an element (an address each): past 4096
// elements (32 a thread) the residual forward spilled at sm_80 / sm_90a, so they stop there (the
// dispatcher sends wider ones to Triton, copies misaligned ones, layer_norm_backends.py).
constexpr int kUnalignedMaxRow = 4096;
// min blocks 1: the whole register file is the budget. The rows are meant to stay in registers;
// left to itself ptxas 13 trades registers for occupancy and spills (tests/test_cuda_resources.py
// checks the built binary).
constexpr int kMinBlocks = 1;

// Block-wide sums of two values; every thread gets both. Up to kMaxThreads threads.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (n_warps == 1) return make_float2(a, b);
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = make_float2(a, b);
  __syncthreads();
  const float2 r = lane < n_warps ? smem[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(r.x), warp_sum(r.y));
}

// Columns of pack p of this thread: [col(p), col(p) + VEC).
template <int VEC>
__device__ __forceinline__ int col_of(int p) {
  return (threadIdx.x + p * blockDim.x) * VEC;
}

// v[p][e] = row[col(p) + e] as float, 0 past C (C % VEC == 0 on the vector path).
template <typename T, int VEC, int NP>
__device__ __forceinline__ void load_row(const T* row, int C, float (&v)[NP][VEC]) {
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = col_of<VEC>(p);
    if (c < C) {
      load_pack<T, VEC>(row + c, v[p]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[p][e] = 0.f;
    }
  }
}

template <typename T, int VEC, int NP>
__device__ __forceinline__ void store_row(T* row, int C, const float (&v)[NP][VEC]) {
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = col_of<VEC>(p);
    if (c < C) store_pack<T, VEC>(row + c, v[p]);
  }
}

template <typename T, int VEC, int NP, bool kResidual, bool kGamma>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    layer_norm_fwd_kernel(const T* __restrict__ x, int64_t stride_x,  // (M, C)
                          const T* __restrict__ residual, int64_t stride_r,  // (M, C) or null
                          const float* __restrict__ gamma,  // (C,) or null
                          const float* __restrict__ weight,  // (C,) or null
                          const float* __restrict__ bias,    // (C,) or null
                          T* __restrict__ y,                 // (M, C), contiguous
                          T* __restrict__ s,                 // (M, C), contiguous, or null
                          float* __restrict__ mean_out, float* __restrict__ rstd_out,  // (M,)
                          int C, float eps) {
  __shared__ float2 smem[32];
  const int64_t row = blockIdx.x;
  float v[NP][VEC];
  load_row<T, VEC, NP>(x + row * stride_x, C, v);
  if constexpr (kResidual) {
    float r[NP][VEC];
    load_row<T, VEC, NP>(residual + row * stride_r, C, r);
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = col_of<VEC>(p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float g = kGamma && c + e < C ? gamma[c + e] : 1.f;
        // the stream is kept in T: normalize the rounded value, as eager would
        v[p][e] = static_cast<float>(static_cast<T>(r[p][e] + g * v[p][e]));
      }
    }
    store_row<T, VEC, NP>(s + row * C, C, v);
  }
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum += v[p][e];  // 0 past C
  const float mean = block_sum2(sum, 0.f, smem).x / C;
  float sq = 0.f;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = col_of<VEC>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = c + e < C ? v[p][e] - mean : 0.f;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum2(sq, 0.f, smem).x / C + eps);
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = col_of<VEC>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float o = (v[p][e] - mean) * rstd;
      if (c + e < C) {
        if (weight != nullptr) o *= weight[c + e];
        if (bias != nullptr) o += bias[c + e];
      }
      v[p][e] = o;
    }
  }
  store_row<T, VEC, NP>(y + row * C, C, v);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int VEC, int NP, bool kGradS, bool kGamma>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    layer_norm_bwd_kernel(const T* __restrict__ gy, int64_t stride_gy,  // (M, C)
                          const T* __restrict__ gs, int64_t stride_gs,  // (M, C) or null
                          const T* __restrict__ s, int64_t stride_s,    // LayerNorm input (M, C)
                          const T* __restrict__ branch, int64_t stride_b,  // (M, C) or null
                          const float* __restrict__ gamma,   // (C,) or null
                          const float* __restrict__ weight,  // (C,) or null
                          const float* __restrict__ mean, const float* __restrict__ rstd,  // (M,)
                          T* __restrict__ ds,  // (M, C), contiguous
                          T* __restrict__ dx,  // (M, C), contiguous, or null
                          float* __restrict__ dw_part,  // (gridDim.x, C)
                          float* __restrict__ db_part,  // (gridDim.x, C)
                          float* __restrict__ dg_part,  // (gridDim.x, C) or null
                          int64_t M, int C) {
  __shared__ float2 smem[32];
  float dw[NP][VEC], db[NP][VEC], dg[NP][VEC];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[p][e] = db[p][e] = dg[p][e] = 0.f;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    float xh[NP][VEC], dy[NP][VEC];
    load_row<T, VEC, NP>(s + row * stride_s, C, xh);
    load_row<T, VEC, NP>(gy + row * stride_gy, C, dy);
    const float m = mean[row], rs = rstd[row];
    float c1 = 0.f, c2 = 0.f;
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = col_of<VEC>(p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool in = c + e < C;
        xh[p][e] = in ? (xh[p][e] - m) * rs : 0.f;
        const float gh = in && weight != nullptr ? dy[p][e] * weight[c + e] : dy[p][e];
        c1 += gh * xh[p][e];
        c2 += gh;
        dw[p][e] += dy[p][e] * xh[p][e];
        db[p][e] += dy[p][e];
      }
    }
    const float2 sums = block_sum2(c1, c2, smem);
    const float mean_gx = sums.x / C, mean_g = sums.y / C;
    float out[NP][VEC];
    if constexpr (kGradS) load_row<T, VEC, NP>(gs + row * stride_gs, C, out);
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int c = col_of<VEC>(p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool in = c + e < C;
        const float gh = in && weight != nullptr ? dy[p][e] * weight[c + e] : dy[p][e];
        const float d = rs * (gh - mean_g - xh[p][e] * mean_gx);
        if constexpr (kGradS) {
          out[p][e] += d;
        } else {
          out[p][e] = d;
        }
      }
    }
    store_row<T, VEC, NP>(ds + row * C, C, out);
    if constexpr (kGamma) {
      float b[NP][VEC];
      load_row<T, VEC, NP>(branch + row * stride_b, C, b);
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const int c = col_of<VEC>(p);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dg[p][e] += out[p][e] * b[p][e];  // b is 0 past C
          out[p][e] *= c + e < C ? gamma[c + e] : 0.f;
        }
      }
      store_row<T, VEC, NP>(dx + row * C, C, out);
    }
  }
  const int64_t part = static_cast<int64_t>(blockIdx.x) * C;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const int c = col_of<VEC>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (c + e < C) {
        dw_part[part + c + e] = dw[p][e];
        db_part[part + c + e] = db[p][e];
        if constexpr (kGamma) dg_part[part + c + e] = dg[p][e];
      }
    }
  }
}

struct RowShape {
  int vec, np, threads;
};

// 16-byte packs when C and every row allow them; then threads and packs per thread for a row.
RowShape row_shape(int64_t C, int element_size, std::initializer_list<const at::Tensor*> rows) {
  const int full = 16 / element_size;
  bool aligned = C % full == 0;
  for (const at::Tensor* t : rows) {
    if (t == nullptr || !t->defined()) continue;
    aligned = aligned && aligned_to(t->data_ptr(), 16) &&
              (t->size(0) <= 1 || t->stride(0) % full == 0);
  }
  const int vec = aligned ? full : 1;
  const int64_t packs = (C + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < packs) threads *= 2;
  int np = 1;
  while (static_cast<int64_t>(np) * threads < packs) np *= 2;
  return {vec, np, threads};
}

// Runtime (VEC, NP) -> a template instantiation; only shapes a row of at most kLimit elements
// can need are compiled.
template <typename T, int kLimit, typename F>
void dispatch_shape(const RowShape& s, F&& f) {
  constexpr int V = 16 / sizeof(T);
  auto with_vec = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    constexpr int kRowLimit = VEC == 1 && kUnalignedMaxRow < kLimit ? kUnalignedMaxRow : kLimit;
    auto call = [&](auto np_tag) {
      constexpr int NP = decltype(np_tag)::value;
      if constexpr (NP * VEC * kMaxThreads <= kRowLimit) {
        f(vec_tag, np_tag);
      } else {
        TORCH_CHECK(false, "layer_norm: rows longer than ", kRowLimit, " elements",
                    VEC == 1 ? " (rows not in 16-byte packs)" : "");
      }
    };
    switch (s.np) {
      case 1: return call(std::integral_constant<int, 1>{});
      case 2: return call(std::integral_constant<int, 2>{});
      case 4: return call(std::integral_constant<int, 4>{});
      case 8: return call(std::integral_constant<int, 8>{});
      case 16: return call(std::integral_constant<int, 16>{});
      case 32: return call(std::integral_constant<int, 32>{});
      default: TORCH_CHECK(false, "layer_norm: rows longer than ", kLimit, " elements");
    }
  };
  if (s.vec == V)
    with_vec(std::integral_constant<int, V>{});
  else
    with_vec(std::integral_constant<int, 1>{});
}

template <typename F>
void dispatch_bools(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  XO_CHECK_CUDA(t, "layer_norm tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), name,
              ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ": expected unit stride along C, got ",
              t.strides());
  XO_CHECK_SAME_DTYPE(x, t, "layer_norm");
  TORCH_CHECK(t.device() == x.device(), name, ": expected device ", x.device(), ", got ",
              t.device());
}

const float* vector_or_null(const c10::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value()) return nullptr;
  XO_CHECK_CUDA(t.value(), "layer_norm parameter");
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 &&
                  t->size(0) == C,
              "layer_norm: ", name, ": expected contiguous float32 (", C, ",), got ",
              t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

}  // namespace

std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias, double eps,
                                           const c10::optional<at::Tensor>& residual,
                                           const c10::optional<at::Tensor>& gamma) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 2, "x");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(C >= 1 && C <= kMaxRow, "layer_norm: x: expected 1 <= C <= ", kMaxRow,
              ", got shape ", x.sizes());
  check_rows(x, x, "x");
  const bool has_r = residual.has_value();
  if (has_r) check_rows(residual.value(), x, "residual");
  TORCH_CHECK(has_r || !gamma.has_value(), "layer_norm: gamma given without a residual");
  const float* w = vector_or_null(weight, C, "weight");
  const float* b = vector_or_null(bias, C, "bias");
  const float* g = vector_or_null(gamma, C, "gamma");
  const at::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, C}, x.options());
  auto s = has_r ? at::empty({M, C}, x.options()) : at::empty({0}, x.options());
  auto mean = at::empty({M}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, s, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor* r = has_r ? &residual.value() : nullptr;
  const RowShape shape = row_shape(C, x.element_size(), {&x, r, &y, &s});
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "layer_norm_forward", [&] {
    dispatch_shape<scalar_t, kMaxRow>(shape, [&](auto vec_tag, auto np_tag) {
      constexpr int VEC = decltype(vec_tag)::value, NP = decltype(np_tag)::value;
      dispatch_bools(has_r, g != nullptr, [&](auto r_tag, auto g_tag) {
        constexpr bool R = decltype(r_tag)::value, G = decltype(g_tag)::value && R;
        layer_norm_fwd_kernel<scalar_t, VEC, NP, R, G><<<M, shape.threads, 0, stream>>>(
            x.data_ptr<scalar_t>(), x.stride(0),
            R ? residual->data_ptr<scalar_t>() : nullptr, R ? residual->stride(0) : 0, g, w, b,
            y.data_ptr<scalar_t>(), R ? s.data_ptr<scalar_t>() : nullptr,
            mean.data_ptr<float>(), rstd.data_ptr<float>(), static_cast<int>(C),
            static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {y, s, mean, rstd};
}

std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad_y,
                                            const c10::optional<at::Tensor>& grad_s,
                                            const at::Tensor& x,
                                            const c10::optional<at::Tensor>& branch,
                                            const c10::optional<at::Tensor>& weight, bool has_bias,
                                            const c10::optional<at::Tensor>& gamma,
                                            const at::Tensor& mean, const at::Tensor& rstd) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 2, "x");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(C >= 1 && C <= kBwdMaxRow, "layer_norm_backward: x: expected 1 <= C <= ",
              kBwdMaxRow, ", got shape ", x.sizes());
  check_rows(x, x, "x");
  check_rows(grad_y, x, "grad_y");
  if (grad_s.has_value()) check_rows(grad_s.value(), x, "grad_s");
  const bool has_g = gamma.has_value();
  TORCH_CHECK(has_g == branch.has_value(), "layer_norm_backward: gamma and branch go together");
  if (has_g) check_rows(branch.value(), x, "branch");
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == M,
                "layer_norm_backward: mean / rstd: expected contiguous float32 (", M, ",)");
  }
  const float* w = vector_or_null(weight, C, "weight");
  const float* g = vector_or_null(gamma, C, "gamma");
  const at::cuda::CUDAGuard guard(x.device());
  auto ds = at::empty({M, C}, x.options());
  auto dx = has_g ? at::empty({M, C}, x.options()) : at::empty({0}, x.options());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(M, 8 * sms));
  auto f32 = x.options().dtype(at::kFloat);
  auto dw = at::zeros({grid, C}, f32), db = at::zeros({grid, C}, f32);
  auto dg = has_g ? at::zeros({grid, C}, f32) : at::empty({0}, f32);
  if (M > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor* gs = grad_s.has_value() ? &grad_s.value() : nullptr;
    const at::Tensor* br = has_g ? &branch.value() : nullptr;
    const RowShape shape = row_shape(C, x.element_size(), {&x, &grad_y, gs, br, &ds, &dx});
    XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "layer_norm_backward", [&] {
      dispatch_shape<scalar_t, kBwdMaxRow>(shape, [&](auto vec_tag, auto np_tag) {
        constexpr int VEC = decltype(vec_tag)::value, NP = decltype(np_tag)::value;
        dispatch_bools(gs != nullptr, has_g, [&](auto s_tag, auto g_tag) {
          constexpr bool S = decltype(s_tag)::value, G = decltype(g_tag)::value;
          layer_norm_bwd_kernel<scalar_t, VEC, NP, S, G><<<grid, shape.threads, 0, stream>>>(
              grad_y.data_ptr<scalar_t>(), grad_y.stride(0),
              S ? gs->data_ptr<scalar_t>() : nullptr, S ? gs->stride(0) : 0,
              x.data_ptr<scalar_t>(), x.stride(0), G ? br->data_ptr<scalar_t>() : nullptr,
              G ? br->stride(0) : 0, g, w, mean.data_ptr<float>(), rstd.data_ptr<float>(),
              ds.data_ptr<scalar_t>(), G ? dx.data_ptr<scalar_t>() : nullptr,
              dw.data_ptr<float>(), db.data_ptr<float>(), G ? dg.data_ptr<float>() : nullptr, M,
              static_cast<int>(C));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  auto empty = at::empty({0}, f32);
  return {ds, dx, weight.has_value() ? dw.sum(0) : empty, has_bias ? db.sum(0) : empty.clone(),
          has_g ? dg.sum(0) : empty.clone()};
}

}  // namespace xray_ops
