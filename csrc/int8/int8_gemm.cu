// int8 GEMM on the tensor cores with the dequantize epilogue fused, CUDA (sm_80+).
//
// C (M, N) = epilogue(A (M, K) int8 @ B (N, K)ᵀ int8); B is nn.Linear's weight layout, which is
// exactly the column-major K x N operand mma.sync's ".col" B expects.
//
// Tiles: a block of 8 warps computes 128 x 128 of C, K in steps of 64 bytes; warps form a
// 2 (M) x 4 (N) grid of 64 x 32 warp tiles = 4 x 4 mma.sync.m16n8k32 (s8 x s8 -> s32) each.
// A 4-stage cp.async pipeline stages the A and B tiles in shared memory (64 KB); ldmatrix.x4
// loads the fragments. Shared-memory rows are 64 bytes; 16-byte chunk c of row r is stored at
// chunk c ^ ((r >> 1) & 3), so the 8 rows an ldmatrix phase reads fall in 8 different bank
// groups (no conflicts).
//
// Epilogue, from the int32 accumulators in registers: y = acc · a_scale[m] · b_scale[n]
// (+ bias[n]) (→ exact GELU, erff) in float32, one cast to the output dtype, two adjacent
// columns per store. The int32 result never reaches memory.
//
// Requirements (checked on the host; the dispatcher sends other inputs elsewhere): K % 16 == 0,
// rows of A and B contiguous and 16-byte aligned.
#include "common.h"
#include "gelu.cuh"
#include "int8/int8.h"

namespace xray_ops {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 4, kThreads = 256;
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 x 32 per warp
constexpr int kMI = kWM / 16, kNI = kWN / 8;              // 4 x 4 mma tiles per warp
constexpr int kAStage = kBM * kBK, kBStage = kBN * kBK;   // bytes
constexpr int kSmemBytes = kStages * (kAStage + kBStage);  // 64 KB

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// byte offset of 16-byte chunk c (0..3) of row r in a [rows][64 bytes] tile (XOR swizzle)
__device__ __forceinline__ int swizzle(int r, int c) {
  return r * kBK + ((c ^ ((r >> 1) & 3)) << 4);
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // src-size 0 zero-fills the destination without reading src (rows past M, chunks past K)
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// c += a (16 x 32, row) · b (32 x 8, col), int8 -> int32
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename T>
__device__ __forceinline__ void store2(T* p, float y0, float y1, bool second, bool pair) {
  if (pair) {  // both columns in range and the address 2-element aligned
    Pack<T, 2> pk;
    pk.v[0] = static_cast<T>(y0);
    pk.v[1] = static_cast<T>(y1);
    *reinterpret_cast<Pack<T, 2>*>(p) = pk;
  } else {
    p[0] = static_cast<T>(y0);
    if (second) p[1] = static_cast<T>(y1);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    int8_gemm_kernel(const int8_t* __restrict__ A,  // (M, K), row stride lda
                     const int8_t* __restrict__ B,  // (N, K), row stride ldb
                     const float* __restrict__ a_scale,  // (M,)
                     const float* __restrict__ b_scale,  // (N,)
                     const float* __restrict__ bias,     // (N,) or nullptr
                     T* __restrict__ C,                  // (M, N), contiguous
                     int64_t M, int N, int K, int64_t lda, int64_t ldb, bool gelu,
                     bool gelu_tanh) {
  extern __shared__ __align__(128) int8_t smem[];
  int8_t* sA = smem;                       // [kStages][kBM][kBK]
  int8_t* sB = smem + kStages * kAStage;  // [kStages][kBN][kBK]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  // N tiles along x: consecutive blocks share an A stripe while it is in L2
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int n0 = blockIdx.x * kBN;
  const int KT = (K + kBK - 1) / kBK;

  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < (kBM * kBK / 16) / kThreads; ++i) {  // 2 chunks of A per thread
      const int id = tid + i * kThreads, r = id >> 2, c = id & 3;
      const int64_t gm = m0 + r;
      const int gk = k0 + c * 16;
      const bool ok = gm < M && gk < K;  // K % 16 == 0: a chunk is all in or all out
      cp_async_16(smem_addr(sA + stage * kAStage + swizzle(r, c)), ok ? A + gm * lda + gk : A,
                  ok);
    }
#pragma unroll
    for (int i = 0; i < (kBN * kBK / 16) / kThreads; ++i) {  // 2 chunks of B per thread
      const int id = tid + i * kThreads, r = id >> 2, c = id & 3;
      const int gn = n0 + r;
      const int gk = k0 + c * 16;
      const bool ok = gn < N && gk < K;
      cp_async_16(smem_addr(sB + stage * kBStage + swizzle(r, c)),
                  ok ? B + static_cast<int64_t>(gn) * ldb + gk : B, ok);
    }
  };

  int acc[kMI][kNI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();  // empty groups keep the group count uniform
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed
    __syncthreads();               // ... for every thread, and stage (kt-1) % kStages is free
    const int next = kt + kStages - 1;
    if (next < KT) load_tile(next % kStages, next);
    cp_async_commit();

    const int8_t* a_tile = sA + (kt % kStages) * kAStage;
    const int8_t* b_tile = sB + (kt % kStages) * kBStage;
#pragma unroll
    for (int kk = 0; kk < kBK / 32; ++kk) {
      uint32_t a[kMI][4], b[kNI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        // matrices: rows 0-7 / 8-15 of the 16-row tile x k bytes 0-15 / 16-31 -> a0..a3
        const int r = warp_m * kWM + mi * 16 + (lane & 15);
        const int c = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[mi], smem_addr(a_tile + swizzle(r, c)));
      }
#pragma unroll
      for (int nj = 0; nj < kNI / 2; ++nj) {
        // matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
        const int r = warp_n * kWN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int c = kk * 2 + ((lane >> 3) & 1);
        uint32_t t[4];
        ldmatrix_x4(t, smem_addr(b_tile + swizzle(r, c)));
        b[2 * nj][0] = t[0];
        b[2 * nj][1] = t[1];
        b[2 * nj + 1][0] = t[2];
        b[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) mma_s8(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

  // fused epilogue: c0, c1 at (row g, cols 2q, 2q+1), c2, c3 at row g + 8 (g = lane / 4,
  // q = lane % 4) of each 16 x 8 tile
  const bool even_n = (N % 2) == 0;
#pragma unroll
  for (int ni = 0; ni < kNI; ++ni) {
    const int col = n0 + warp_n * kWN + ni * 8 + (lane & 3) * 2;
    if (col >= N) continue;
    const bool second = col + 1 < N;
    const float bs0 = b_scale[col], bs1 = second ? b_scale[col + 1] : 0.f;
    const float bi0 = bias != nullptr ? bias[col] : 0.f;
    const float bi1 = bias != nullptr && second ? bias[col + 1] : 0.f;
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m * kWM + mi * 16 + (lane >> 2) + h * 8;
        if (row >= M) continue;
        const float as = a_scale[row];
        float y0 = static_cast<float>(acc[mi][ni][2 * h]) * as * bs0 + bi0;
        float y1 = static_cast<float>(acc[mi][ni][2 * h + 1]) * as * bs1 + bi1;
        if (gelu) {  // the GELU of bias_gelu (gelu.cuh)
          y0 = gelu_tanh ? xray_ops::gelu<true>(y0) : xray_ops::gelu<false>(y0);
          y1 = gelu_tanh ? xray_ops::gelu<true>(y1) : xray_ops::gelu<false>(y1);
        }
        store2<T>(C + row * N + col, y0, y1, second, second && even_n);
      }
    }
  }
}

void check_operand(const at::Tensor& t, const char* name) {
  XO_CHECK_CUDA(t, "int8_matmul operand");
  TORCH_CHECK(t.scalar_type() == at::kChar, name, ": expected int8, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) % 16 == 0, name, ": expected K % 16 == 0, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || (t.stride(1) == 1 && t.stride(0) % 16 == 0 &&
                                 aligned_to(t.data_ptr(), 16)),
              name, ": expected contiguous, 16-byte aligned rows, got strides ", t.strides());
}

void check_vector(const at::Tensor& t, int64_t n, const char* name) {
  XO_CHECK_CUDA(t, "int8_matmul vector");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              ": expected a contiguous float32 tensor of ", n, " elements, got ",
              t.scalar_type(), " ", t.sizes());
}

}  // namespace

at::Tensor int8_matmul(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias,
                       c10::ScalarType out_dtype, bool gelu, bool gelu_tanh) {
  check_operand(a_q, "a_q");
  check_operand(b_q, "b_q");
  const int64_t M = a_q.size(0), K = a_q.size(1), N = b_q.size(0);
  TORCH_CHECK(b_q.size(1) == K, "b_q: expected shape (", N, ", ", K, "), got ", b_q.sizes());
  TORCH_CHECK(K <= 131071, "a_q: int32 accumulation is exact up to K = 131071, got K = ", K);
  TORCH_CHECK(N < (int64_t(1) << 31), "b_q: too many rows");
  TORCH_CHECK((M + kBM - 1) / kBM <= 65535, "a_q: at most ", 65535 * kBM, " rows, got ", M);
  check_vector(a_scale, M, "a_scale");
  check_vector(b_scale, N, "b_scale");
  if (bias.has_value()) check_vector(bias.value(), N, "bias");
  const at::cuda::CUDAGuard guard(a_q.device());
  auto out = at::empty({M, N}, a_q.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  const float* bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  XO_DISPATCH_HALF_BF16_FLOAT(out_dtype, "int8_matmul", [&] {
    auto kernel = int8_gemm_kernel<scalar_t>;
    // more than the default 48 KB of dynamic shared memory needs an opt-in (sm_80: 164 KB)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kSmemBytes));
    kernel<<<grid, kThreads, kSmemBytes, stream>>>(
        a_q.data_ptr<int8_t>(), b_q.data_ptr<int8_t>(), a_scale.data_ptr<float>(),
        b_scale.data_ptr<float>(), bias_ptr, out.data_ptr<scalar_t>(), M, static_cast<int>(N),
        static_cast<int>(K), a_q.stride(0), b_q.stride(0), gelu, gelu_tanh);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace xray_ops
