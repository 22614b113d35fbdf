// Shared helpers for the xray_ops CUDA kernels: argument checks, dtype dispatch, vector types.
#pragma once

// Only ATen/c10 headers here: <torch/extension.h> (pybind11, Python) is for bindings.cpp alone,
// which keeps every .cu file's compile short.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#define XO_CHECK_CUDA(t, name) \
  TORCH_CHECK((t).is_cuda(), name ": expected a CUDA tensor, got one on ", (t).device())
#define XO_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), name ": expected a " #d "-D tensor, got shape ", (t).sizes())
#define XO_CHECK_SAME_DTYPE(a, b, name)                                                    \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), name ": expected dtype ",           \
              (a).scalar_type(), ", got ", (b).scalar_type())

// Runtime dtype -> compile-time `scalar_t` for the three dtypes our kernels take.
#define XO_DISPATCH_HALF_BF16_FLOAT(TYPE, NAME, ...)                                       \
  [&] {                                                                                    \
    switch (TYPE) {                                                                        \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }        \
      case at::ScalarType::Half: { using scalar_t = at::Half; return __VA_ARGS__(); }      \
      case at::ScalarType::BFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, NAME ": expected float32, float16 or bfloat16, got ", TYPE); \
    }                                                                                      \
  }()

namespace xray_ops {

// VEC elements of T moved as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace xray_ops
