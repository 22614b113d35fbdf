// ToMe size-weighted merge along a matching (xray_ops.tome_merge), forward and backward, CUDA.
//
// Both directions are gathers, so no atomics and bitwise-reproducible results (grid: row blocks
// on x, the batch on y):
//   forward:  a warp per output slot walks its group (slot_src[slot_start[o]:slot_start[o+1]]:
//             the slot's own token, then the A tokens merged into it), accumulates size·x and
//             size in fp32 and writes sum(size·x) / sum(size) and sum(size). x is read once.
//   backward: a warp per input token p reads its slot o = dest[p]:
//             grad_x[p] = size[p] / size_out[o] · grad_out[o];
//             grad_size[p] = <grad_out[o], x[p] - x_out[o]> / size_out[o] + grad_size_out[o].
// 16-byte vector loads when the channel dimension is unit-stride and rows are aligned.
#include "common.h"
#include "tome/tome.h"

namespace xray_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A register budget of 64 per thread (at least 4 blocks per SM): left to itself ptxas 13 aims
// for full occupancy and spills 8 B per thread in the forward.
constexpr int kMinBlocks = 4;
// Grid: x = blocks of kWarps rows (slots or tokens; up to 2^31 - 1, so any N < 2^30), y = the
// batch, capped at the y limit with a grid-stride loop over b beyond it.
constexpr int64_t kMaxGridY = 65535;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    tome_merge_fwd_kernel(const T* __restrict__ x,              // (B, N, C), strides sx*
                          const T* __restrict__ size,           // (B, N, 1), strides ss* or null
                          const int64_t* __restrict__ slot_src,    // (B, N)
                          const int64_t* __restrict__ slot_start,  // (B, n_out + 1)
                          T* __restrict__ out,                  // (B, n_out, C), contiguous
                          T* __restrict__ size_out,             // (B, n_out, 1), contiguous
                          int64_t B, int N, int C, int n_out, int64_t sxb, int64_t sxn,
                          int64_t sxc, int64_t ssb, int64_t ssn) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (o >= n_out) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t st = slot_start[b * (n_out + 1) + o], en = slot_start[b * (n_out + 1) + o + 1];
    const int64_t* group = slot_src + b * N;
    const T* xb = x + b * sxb;
    float total = 0.f;
    for (int64_t t = st; t < en; ++t)
      total += size ? static_cast<float>(size[b * ssb + group[t] * ssn]) : 1.f;
    T* orow = out + (b * n_out + o) * (int64_t)C;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
      for (int64_t t = st; t < en; ++t) {  // the group's fixed order: deterministic sums
        const int64_t p = group[t];
        const float s = size ? static_cast<float>(size[b * ssb + p * ssn]) : 1.f;
        float v[VEC];
        load_pack<T, VEC>(xb + p * sxn + c * sxc, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] = fmaf(s, v[k], acc[k]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = __fdiv_rn(acc[k], total);
      store_pack<T, VEC>(orow + c, acc);
    }
    if (lane == 0) size_out[b * n_out + o] = static_cast<T>(total);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    tome_merge_bwd_kernel(const T* __restrict__ go,     // (B, n_out, C), strides sg*
                          const T* __restrict__ gso,    // (B, n_out, 1), strides sgs* or null
                          const T* __restrict__ x,      // (B, N, C), strides sx*
                          const T* __restrict__ size,   // (B, N, 1), strides ss* or null
                          const T* __restrict__ xo,     // (B, n_out, C), strides so*
                          const T* __restrict__ so,     // (B, n_out, 1), strides sso*
                          const int64_t* __restrict__ dest,  // (B, N)
                          T* __restrict__ gx,           // (B, N, C), contiguous
                          T* __restrict__ gs,           // (B, N, 1), contiguous
                          int64_t B, int N, int C, bool size_grad, int64_t sgb, int64_t sgn,
                          int64_t sgc,
                          int64_t sgsb, int64_t sgsn, int64_t sxb, int64_t sxn, int64_t sxc,
                          int64_t ssb, int64_t ssn, int64_t sob, int64_t son, int64_t soc,
                          int64_t ssob, int64_t sson) {
  const int lane = threadIdx.x & 31;
  const int p = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (p >= N) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t o = dest[b * N + p];
    const float S = static_cast<float>(so[b * ssob + o * sson]);
    const float s = size ? static_cast<float>(size[b * ssb + p * ssn]) : 1.f;
    const float w = __fdiv_rn(s, S);
    const T* grow = go + b * sgb + o * sgn;
    const T* xrow = x + b * sxb + p * sxn;
    const T* orow = xo + b * sob + o * son;
    T* gxrow = gx + (b * N + p) * (int64_t)C;
    float dot = 0.f;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
      float g[VEC], r[VEC];
      load_pack<T, VEC>(grow + c * sgc, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) r[k] = w * g[k];
      store_pack<T, VEC>(gxrow + c, r);
      if (size_grad) {
        float xv[VEC], ov[VEC];
        load_pack<T, VEC>(xrow + c * sxc, xv);
        load_pack<T, VEC>(orow + c * soc, ov);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot = fmaf(g[k], xv[k] - ov[k], dot);
      }
    }
    dot = warp_sum(dot);  // butterfly: a fixed order
    if (lane == 0) {
      float v = 0.f;
      if (size_grad) {
        v = __fdiv_rn(dot, S);
        if (gso) v += static_cast<float>(gso[b * sgsb + o * sgsn]);
      }
      gs[b * N + p] = static_cast<T>(v);
    }
  }
}

// Largest VEC (16 bytes) usable: unit channel stride, whole packs per row, aligned rows.
template <typename T>
int vector_width(int64_t C, std::initializer_list<const at::Tensor*> ts) {
  constexpr int V = 16 / sizeof(T);
  if (C % V != 0) return 1;
  for (const at::Tensor* t : ts) {
    if (!aligned_to(t->data_ptr(), 16) || (C > 1 && t->stride(2) != 1)) return 1;
    for (int d = 0; d < 2; ++d)
      if (t->size(d) > 1 && t->stride(d) % V != 0) return 1;
  }
  return V;
}

void check_x(const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& dest) {
  XO_CHECK_CUDA(x, "x");
  XO_CHECK_DIM(x, 3, "x");
  XO_CHECK_CUDA(dest, "dest");
  TORCH_CHECK(dest.scalar_type() == at::kLong && dest.dim() == 2 && dest.size(0) == x.size(0) &&
                  dest.size(1) == x.size(1),
              "dest: expected an int64 tensor of shape (", x.size(0), ", ", x.size(1), ")");
  TORCH_CHECK(x.size(1) < (int64_t(1) << 30) && x.size(2) < (int64_t(1) << 30),
              "x: too large, shape ", x.sizes());
  if (size) {
    XO_CHECK_CUDA(*size, "size");
    XO_CHECK_SAME_DTYPE(x, *size, "size");
    TORCH_CHECK(size->dim() == 3 && size->size(0) == x.size(0) && size->size(1) == x.size(1) &&
                    size->size(2) == 1,
                "size: expected shape (", x.size(0), ", ", x.size(1), ", 1), got ", size->sizes());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tome_merge_forward(const at::Tensor& x,
                                                      const std::optional<at::Tensor>& size,
                                                      const at::Tensor& dest,
                                                      const at::Tensor& slot_src_in,
                                                      const at::Tensor& slot_start_in) {
  check_x(x, size, dest);
  const at::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(slot_start_in.dim() == 2 && slot_start_in.size(0) == B &&
                  slot_start_in.size(1) >= 1 && slot_start_in.size(1) <= N + 1,
              "slot_start: expected shape (", B, ", n_out + 1), got ", slot_start_in.sizes());
  TORCH_CHECK(slot_src_in.dim() == 2 && slot_src_in.size(0) == B && slot_src_in.size(1) == N,
              "slot_src: expected shape (", B, ", ", N, "), got ", slot_src_in.sizes());
  const auto slot_src = slot_src_in.contiguous(), slot_start = slot_start_in.contiguous();
  const int64_t n_out = slot_start.size(1) - 1;
  auto out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::empty({B, n_out, 1}, x.options());
  if (B == 0 || n_out == 0) return {out, size_out};
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid((n_out + kWarps - 1) / kWarps, std::min(B, kMaxGridY));
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "tome_merge_forward", [&] {
    const scalar_t* sp = size ? size->data_ptr<scalar_t>() : nullptr;
    const int64_t ssb = size ? size->stride(0) : 0, ssn = size ? size->stride(1) : 0;
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      tome_merge_fwd_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), sp, slot_src.data_ptr<int64_t>(),
          slot_start.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          size_out.data_ptr<scalar_t>(), B, N, C, n_out, x.stride(0), x.stride(1), x.stride(2),
          ssb, ssn);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vector_width<scalar_t>(C, {&x, &out}) > 1)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return {out, size_out};
}

std::tuple<at::Tensor, at::Tensor> tome_merge_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_size_out,
    const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& x_out,
    const at::Tensor& size_out, const at::Tensor& dest_in, bool size_grad) {
  check_x(x, size, dest_in);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  for (const at::Tensor* t : {&grad_out, &x_out}) {
    XO_CHECK_CUDA(*t, "grad_out / x_out");
    XO_CHECK_SAME_DTYPE(x, *t, "grad_out / x_out");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == size_out.size(1) &&
                    t->size(2) == C,
                "grad_out / x_out: expected shape (", B, ", ", size_out.size(1), ", ", C,
                "), got ", t->sizes());
  }
  XO_CHECK_CUDA(size_out, "size_out");
  XO_CHECK_SAME_DTYPE(x, size_out, "size_out");
  TORCH_CHECK(size_out.dim() == 3 && size_out.size(0) == B && size_out.size(2) == 1,
              "size_out: expected shape (B, n_out, 1), got ", size_out.sizes());
  if (grad_size_out) {
    XO_CHECK_CUDA(*grad_size_out, "grad_size_out");
    XO_CHECK_SAME_DTYPE(x, *grad_size_out, "grad_size_out");
    TORCH_CHECK(grad_size_out->sizes() == size_out.sizes(), "grad_size_out: expected shape ",
                size_out.sizes(), ", got ", grad_size_out->sizes());
  }
  const at::cuda::CUDAGuard guard(x.device());
  const auto dest = dest_in.contiguous();
  auto gx = at::empty({B, N, C}, x.options());
  auto gs = at::empty({B, N, 1}, x.options());
  if (B == 0 || N == 0) return {gx, gs};
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid((N + kWarps - 1) / kWarps, std::min(B, kMaxGridY));
  const bool sg = size_grad && size.has_value();
  XO_DISPATCH_HALF_BF16_FLOAT(x.scalar_type(), "tome_merge_backward", [&] {
    const scalar_t* sp = size ? size->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gsop = grad_size_out ? grad_size_out->data_ptr<scalar_t>() : nullptr;
    const int64_t ssb = size ? size->stride(0) : 0, ssn = size ? size->stride(1) : 0;
    const int64_t sgsb = grad_size_out ? grad_size_out->stride(0) : 0;
    const int64_t sgsn = grad_size_out ? grad_size_out->stride(1) : 0;
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      tome_merge_bwd_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), gsop, x.data_ptr<scalar_t>(), sp,
          x_out.data_ptr<scalar_t>(), size_out.data_ptr<scalar_t>(), dest.data_ptr<int64_t>(),
          gx.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), B, N, C, sg, grad_out.stride(0),
          grad_out.stride(1), grad_out.stride(2), sgsb, sgsn, x.stride(0), x.stride(1),
          x.stride(2), ssb, ssn, x_out.stride(0), x_out.stride(1), x_out.stride(2),
          size_out.stride(0), size_out.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // x and x_out are read only for the size gradient (otherwise they may be placeholders)
    const bool vec = sg ? vector_width<scalar_t>(C, {&grad_out, &x, &x_out, &gx}) > 1
                        : vector_width<scalar_t>(C, {&grad_out, &gx}) > 1;
    if (vec)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  return {gx, gs};
}

}  // namespace xray_ops
