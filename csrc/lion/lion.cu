// Multi-tensor Lion, CUDA: one launch updates every tensor of a parameter group.
//
// The host builds one int64 table, [P (T), G (T), M (T) addresses, START (T + 1), NUMEL (T)],
// where START[t] is the first chunk of tensor t (kChunk elements a chunk), and copies it to the
// device from pinned memory (asynchronously). Block i owns chunk i: a binary search over START
// finds its tensor, and its threads update the chunk reading p, g, m once and writing p, m once,
// in float32, with 4-element vector loads where the tensor's three pointers are aligned (the
// layout of kernels/lion.py, so both backends read the same table).
#include "common.h"
#include "lion/lion.h"

namespace xray_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kChunk = kThreads * kVec * 4;  // 4096 elements: 4 packs of 4 a thread

__device__ __forceinline__ bool aligned_on_device(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float lion_sign(float c) {
  return c > 0.f ? 1.f : (c < 0.f ? -1.f : c);  // sign(0) = 0; NaN stays NaN
}

template <typename TP, typename TM>
__global__ void __launch_bounds__(kThreads)
    lion_kernel(const int64_t* __restrict__ table,  // (5 T + 1,), see above
                int T, float decay, float lr, float beta1, float beta2) {
  const int64_t* start = table + 3 * T;
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = T;  // START[lo] <= chunk < START[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (start[mid] <= chunk) lo = mid; else hi = mid;
  }
  TP* p = reinterpret_cast<TP*>(table[lo]);
  const TP* g = reinterpret_cast<const TP*>(table[T + lo]);
  TM* m = reinterpret_cast<TM*>(table[2 * T + lo]);
  const int64_t numel = table[4 * T + 1 + lo];
  const int64_t first = (chunk - start[lo]) * kChunk;
  const bool vec_ok = aligned_on_device(p, sizeof(TP) * kVec) &&
                      aligned_on_device(g, sizeof(TP) * kVec) &&
                      aligned_on_device(m, sizeof(TM) * kVec);
  for (int i = threadIdx.x * kVec; i < kChunk; i += kThreads * kVec) {
    const int64_t idx = first + i;
    if (idx >= numel) break;
    float pv[kVec], gv[kVec], mv[kVec];
    const bool whole = vec_ok && idx + kVec <= numel;
    if (whole) {
      load_pack<TP, kVec>(p + idx, pv);
      load_pack<TP, kVec>(g + idx, gv);
      load_pack<TM, kVec>(m + idx, mv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const bool in = idx + e < numel;
        pv[e] = in ? static_cast<float>(p[idx + e]) : 0.f;
        gv[e] = in ? static_cast<float>(g[idx + e]) : 0.f;
        mv[e] = in ? static_cast<float>(m[idx + e]) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float c = mv[e] * beta1 + gv[e] * (1.f - beta1);
      pv[e] = pv[e] * decay - lr * lion_sign(c);
      mv[e] = mv[e] * beta2 + gv[e] * (1.f - beta2);
    }
    if (whole) {
      store_pack<TP, kVec>(p + idx, pv);
      store_pack<TM, kVec>(m + idx, mv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (idx + e < numel) {
          p[idx + e] = static_cast<TP>(pv[e]);
          m[idx + e] = static_cast<TM>(mv[e]);
        }
      }
    }
  }
}

void check_list(const std::vector<at::Tensor>& ts, const at::Tensor& first, at::ScalarType dtype,
                const std::vector<at::Tensor>& params, const char* name) {
  TORCH_CHECK(ts.size() == params.size(), "lion_step: ", name, ": expected ", params.size(),
              " tensors, got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.device() == first.device(), "lion_step: ", name, "[", i, "]: expected device ",
                first.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "lion_step: ", name, "[", i, "]: expected dtype ",
                dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "lion_step: ", name, "[", i, "]: expected a contiguous tensor");
    TORCH_CHECK(t.numel() == params[i].numel(), "lion_step: ", name, "[", i, "]: expected ",
                params[i].numel(), " elements, got ", t.numel());
  }
}

}  // namespace

void lion_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, double lr, double beta1, double beta2,
               double weight_decay) {
  if (params.empty()) return;
  const at::Tensor& first = params[0];
  XO_CHECK_CUDA(first, "params");
  const auto tp = first.scalar_type(), tm = exp_avgs.empty() ? tp : exp_avgs[0].scalar_type();
  TORCH_CHECK(tp == at::kFloat || tp == at::kBFloat16,
              "lion_step: params: expected float32 or bfloat16, got ", tp);
  TORCH_CHECK(tm == at::kFloat || tm == at::kBFloat16,
              "lion_step: exp_avgs: expected float32 or bfloat16, got ", tm);
  check_list(params, first, tp, params, "params");
  check_list(grads, first, tp, params, "grads");
  check_list(exp_avgs, first, tm, params, "exp_avgs");
  const int T = static_cast<int>(params.size());
  auto table = at::empty({5 * T + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int t = 0; t < T; ++t) {
    h[t] = reinterpret_cast<int64_t>(params[t].data_ptr());
    h[T + t] = reinterpret_cast<int64_t>(grads[t].data_ptr());
    h[2 * T + t] = reinterpret_cast<int64_t>(exp_avgs[t].data_ptr());
    h[3 * T + t] = chunks;
    h[4 * T + 1 + t] = params[t].numel();
    chunks += (params[t].numel() + kChunk - 1) / kChunk;
  }
  h[4 * T] = chunks;
  if (chunks == 0) return;
  TORCH_CHECK(chunks < (int64_t{1} << 31), "lion_step: too many elements");
  const at::cuda::CUDAGuard guard(first.device());
  // pinned source: an asynchronous copy; the host allocator keeps the buffer until it is done
  const at::Tensor dev = table.to(first.device(), /*non_blocking=*/true);
  auto stream = at::cuda::getCurrentCUDAStream();
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  auto launch = [&](auto p_tag, auto m_tag) {
    using TP = typename decltype(p_tag)::type;
    using TM = typename decltype(m_tag)::type;
    lion_kernel<TP, TM><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        dev.data_ptr<int64_t>(), T, decay, static_cast<float>(lr), static_cast<float>(beta1),
        static_cast<float>(beta2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using F = c10::impl::ScalarTypeToCPPTypeT<at::kFloat>;
  using B = c10::impl::ScalarTypeToCPPTypeT<at::kBFloat16>;
  struct tf { using type = F; };
  struct tb { using type = B; };
  if (tp == at::kFloat) {
    if (tm == at::kFloat) launch(tf{}, tf{}); else launch(tf{}, tb{});
  } else {
    if (tm == at::kFloat) launch(tb{}, tf{}); else launch(tb{}, tb{});
  }
}

}  // namespace xray_ops
