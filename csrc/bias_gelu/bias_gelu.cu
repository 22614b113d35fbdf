// bias + GELU, CUDA: y = gelu(x + bias) and its backward, on the GELU of csrc/gelu.cuh.
//
// Grid (row groups, column chunks): a thread owns one pack of VEC columns (16-byte loads when
// C and the rows allow) and walks the rows of its block's group, so the bias is loaded once
// and, in the backward, the column sum of d bias stays in registers; it is written to the
// block's row of a (row groups, C) float32 buffer that the caller sums (fixed order,
// deterministic). Math in float32, one cast to T.
#include "common.h"
#include "gelu.cuh"
#include "bias_gelu/bias_gelu.h"

namespace xray_ops {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC, bool kTanh, bool kBias>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_fwd_kernel(const T* __restrict__ x, int64_t stride_x,  // (M, C)
                         const float* __restrict__ bias,             // (C,) or null
                         T* __restrict__ y,                          // (M, C), contiguous
                         int64_t M, int C) {
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // C % VEC == 0 on the vector path: whole packs
  float b[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) b[e] = kBias ? bias[c + e] : 0.f;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    float v[VEC];
    load_pack<T, VEC>(x + row * stride_x + c, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = gelu<kTanh>(v[e] + b[e]);
    store_pack<T, VEC>(y + row * C + c, v);
  }
}

template <typename T, int VEC, bool kTanh, bool kBias>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_bwd_kernel(const T* __restrict__ gy, int64_t stride_gy,  // (M, C)
                         const T* __restrict__ x, int64_t stride_x,    // (M, C)
                         const float* __restrict__ bias,               // (C,) or null
                         T* __restrict__ gx,                           // (M, C), contiguous
                         float* __restrict__ gb_part,                  // (gridDim.x, C) or null
                         int64_t M, int C) {
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  float b[VEC], acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    b[e] = kBias ? bias[c + e] : 0.f;
    acc[e] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    float g[VEC], v[VEC];
    load_pack<T, VEC>(gy + row * stride_gy + c, g);
    load_pack<T, VEC>(x + row * stride_x + c, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      g[e] *= gelu_grad<kTanh>(v[e] + b[e]);
      acc[e] += g[e];
    }
    store_pack<T, VEC>(gx + row * C + c, g);
  }
  if constexpr (kBias) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) gb_part[static_cast<int64_t>(blockIdx.x) * C + c + e] = acc[e];
  }
}

// 16-byte packs when C and every row allow them.
int pack_width(int64_t C, int element_size, std::initializer_list<const at::Tensor*> rows) {
  const int full = 16 / element_size;
  bool ok = C % full == 0;
  for (const at::Tensor* t : rows) {
    ok = ok && aligned_to(t->data_ptr(), 16) && (t->size(0) <= 1 || t->stride(0) % full == 0);
  }
  return ok ? full : 1;
}

dim3 grid_of(int64_t M, int64_t C, int vec) {
  const int64_t col_chunks = (C + kThreads * vec - 1) / (kThreads * vec);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // about 16 blocks of 256 threads per SM in all: enough loads in flight for the bandwidth
  const int64_t row_groups = std::max<int64_t>(1, std::min<int64_t>(M, 16 * sms / col_chunks));
  return dim3(static_cast<unsigned>(row_groups), static_cast<unsigned>(col_chunks));
}

template <typename T, typename F>
void dispatch(int vec, bool tanh, bool has_bias, F&& f) {
  constexpr int V = 16 / sizeof(T);
  auto with = [&](auto vec_tag) {
    if (tanh) {
      if (has_bias) f(vec_tag, std::true_type{}, std::true_type{});
      else f(vec_tag, std::true_type{}, std::false_type{});
    } else {
      if (has_bias) f(vec_tag, std::false_type{}, std::true_type{});
      else f(vec_tag, std::false_type{}, std::false_type{});
    }
  };
  if (vec == V)
    with(std::integral_constant<int, V>{});
  else
    with(std::integral_constant<int, 1>{});
}

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  XO_CHECK_CUDA(t, "bias_gelu tensor");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == x.sizes(), "bias_gelu: ", name, ": expected shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "bias_gelu: ", name,
              ": expected unit stride along C, got ", t.strides());
  XO_CHECK_SAME_DTYPE(x, t, "bias_gelu");
  TORCH_CHECK(t.device() == x.device(), "bias_gelu: ", name, ": expected device ", x.device());
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t C) {
  if (!bias.has_value()) return nullptr;
  XO_CHECK_CUDA(bias.value(), "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                  bias->size(0) == C,
              "bias_gelu: bias: expected contiguous float32 (", C, ",), got ",
              bias->scalar_type(), " ", bias->sizes());
  return bias->data_ptr<float>();
}

}  // namespace

at::Tensor bias_gelu_forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                             bool tanh) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 2, "x");
  check_rows(x, x, "x");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(C < (int64_t{1} << 31), "bias_gelu: C too large");
  const float* b = bias_ptr(bias, C);
  const at::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, C}, x.options());
  if (M == 0 || C == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "bias_gelu_forward", [&] {
    const int vec = pack_width(C, sizeof(scalar_t), {&x, &y});
    const dim3 grid = grid_of(M, C, vec);
    dispatch<scalar_t>(vec, tanh, b != nullptr, [&](auto vec_tag, auto tanh_tag, auto bias_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      bias_gelu_fwd_kernel<scalar_t, VEC, decltype(tanh_tag)::value, decltype(bias_tag)::value>
          <<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), x.stride(0), b,
                                          y.data_ptr<scalar_t>(), M, static_cast<int>(C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::vector<at::Tensor> bias_gelu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                           const c10::optional<at::Tensor>& bias, bool tanh) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 2, "x");
  check_rows(x, x, "x");
  check_rows(grad_y, x, "grad_y");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(C < (int64_t{1} << 31), "bias_gelu: C too large");
  const float* b = bias_ptr(bias, C);
  const at::cuda::CUDAGuard guard(x.device());
  auto gx = at::empty({M, C}, x.options());
  auto f32 = x.options().dtype(at::kFloat);
  if (M == 0 || C == 0) return {gx, b != nullptr ? at::zeros({C}, f32) : at::empty({0}, f32)};
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor part;
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "bias_gelu_backward", [&] {
    const int vec = pack_width(C, sizeof(scalar_t), {&x, &grad_y, &gx});
    const dim3 grid = grid_of(M, C, vec);
    part = b != nullptr ? at::empty({static_cast<int64_t>(grid.x), C}, f32) : at::empty({0}, f32);
    dispatch<scalar_t>(vec, tanh, b != nullptr, [&](auto vec_tag, auto tanh_tag, auto bias_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      constexpr bool B = decltype(bias_tag)::value;
      bias_gelu_bwd_kernel<scalar_t, VEC, decltype(tanh_tag)::value, B>
          <<<grid, kThreads, 0, stream>>>(grad_y.data_ptr<scalar_t>(), grad_y.stride(0),
                                          x.data_ptr<scalar_t>(), x.stride(0), b,
                                          gx.data_ptr<scalar_t>(),
                                          B ? part.data_ptr<float>() : nullptr, M,
                                          static_cast<int>(C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gx, b != nullptr ? part.sum(0) : part};
}

}  // namespace xray_ops
