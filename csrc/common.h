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

// VEC elements of T as float: one 16-byte load when VEC > 1 (the caller guarantees a unit
// stride and alignment on that path), a scalar load otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[VEC]) {
  if constexpr (VEC > 1) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(pk.v[k]);
  } else {
    v[0] = static_cast<float>(p[0]);
  }
}

// VEC floats stored as T (one cast each), as one transaction when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[VEC]) {
  if constexpr (VEC > 1) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  } else {
    p[0] = static_cast<T>(v[0]);
  }
}

// VEC elements copied bit for bit.
template <typename T, int VEC>
__device__ __forceinline__ void copy_pack(T* dst, const T* src) {
  if constexpr (VEC > 1) {
    *reinterpret_cast<Pack<T, VEC>*>(dst) = *reinterpret_cast<const Pack<T, VEC>*>(src);
  } else {
    dst[0] = src[0];
  }
}

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
