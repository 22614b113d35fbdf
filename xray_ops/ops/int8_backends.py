"""Backend tables of the int8 ops: one :class:`Impl` per (op, backend), with its limits.

Canonical (dispatched) arguments, always 2-D (the op bodies flatten leading dims):
  quantize_per_token  (x (M, K),)
  layernorm_quant     (x (M, C), weight | None, bias | None, eps)
  int8_matmul         (a_q (M, K), b_q (N, K), a_scale (M, 1), b_scale (N,), bias | None,
                       out_dtype, activation "none" | "gelu")
  int8_linear         (x (M, K), w_q (N, K), w_scale (N,), bias | None, activation)
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._dispatch import Impl, register
from ..reference import int8 as ref

# Triton's layernorm_quant keeps a whole row in registers.
TRITON_MAX_ROW = 16384
# The CUDA quantize / layernorm_quant kernels keep a row in registers (csrc/int8/int8_quant.cu).
CUDA_MAX_ROW = 8192
_HALF_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# launchers (lazy imports: Triton, the extension and numba load on first use)
# ----------------------------------------------------------------------------------------------
def _triton_quantize(x):
    from ..kernels import int8_quant as k

    return k.quantize_per_token(x)


def _triton_layernorm_quant(x, weight, bias, eps):
    from ..kernels import int8_quant as k

    return k.layernorm_quant(x, weight, bias, eps)


def _triton_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    from ..kernels import int8_gemm as k

    return k.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation == "gelu")


def _triton_linear(x, w_q, w_scale, bias, activation):
    from ..kernels import int8_gemm as k
    from ..kernels import int8_quant as kq

    x_q, x_scale = kq.quantize_per_token(x)
    return k.int8_matmul(x_q, w_q, x_scale, w_scale, bias, x.dtype, activation == "gelu")


def _rows(x):
    # the CUDA kernels read rows with unit stride (16-byte vector loads when aligned)
    return x if x.stride(-1) == 1 else x.contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).reshape(-1).contiguous()


def _cuda_quantize(x):
    from .. import _ext

    return tuple(_ext.get().int8_quantize_per_token(_rows(x)))


def _cuda_layernorm_quant(x, weight, bias, eps):
    from .. import _ext

    return tuple(_ext.get().int8_layernorm_quant(_rows(x), _f32(weight), _f32(bias), eps))


def _cuda_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    from .. import _ext

    return _ext.get().int8_matmul(a_q, b_q, _f32(a_scale), _f32(b_scale), _f32(bias),
                                  out_dtype, activation == "gelu")


def _cuda_linear(x, w_q, w_scale, bias, activation):
    from .. import _ext

    ext = _ext.get()
    x_q, x_scale = ext.int8_quantize_per_token(_rows(x))
    return ext.int8_matmul(x_q, w_q, x_scale.reshape(-1), _f32(w_scale), _f32(bias), x.dtype,
                           activation == "gelu")


def _cpu_quantize(x):
    from ..cpu import int8 as k

    return k.quantize_per_token(x)


def _cpu_layernorm_quant(x, weight, bias, eps):
    from ..cpu import int8 as k

    return k.layernorm_quant(x, weight, bias, eps)


def _cpu_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    from ..cpu import int8 as k

    return k.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation == "gelu")


def _cpu_linear(x, w_q, w_scale, bias, activation):
    from ..cpu import int8 as k

    return k.int8_linear(x, w_q, w_scale, bias, activation == "gelu")


# ----------------------------------------------------------------------------------------------
# per-input limits
# ----------------------------------------------------------------------------------------------
def _triton_row_check(x, *rest):
    C = x.shape[-1]
    return [f"C={C} exceeds the Triton kernel's row limit {TRITON_MAX_ROW}"] \
        if C > TRITON_MAX_ROW else []


def _cuda_row_check(x, *rest):
    C = x.shape[-1]
    return [f"C={C} exceeds the CUDA kernel's row limit {CUDA_MAX_ROW}"] \
        if C > CUDA_MAX_ROW else []


def _triton_gemm_check(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    # the Triton epilogue computes in float32: a float64 result would not be the float64
    # epilogue rounded once (the torch and cpu backends compute that)
    return [f"out_dtype {out_dtype}: the Triton epilogue computes in float32 (float64 output: "
            f"torch or cpu backend)"] if out_dtype == torch.float64 else []


def _cuda_gemm_check(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    K = a_q.shape[1]
    reasons = []
    if out_dtype not in _HALF_FLOAT:
        reasons.append(f"out_dtype {out_dtype} not supported (float16, bfloat16, float32)")
    if K % 16:
        reasons.append(f"K={K} is not a multiple of 16 (16-byte cp.async rows)")
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if t.numel() and (t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16):
            reasons.append(f"{name} rows are not contiguous and 16-byte aligned "
                           f"(strides {tuple(t.stride())})")
    return reasons


def _cuda_linear_check(x, w_q, *rest):
    K = x.shape[1]
    reasons = _cuda_row_check(x)
    if K % 16:
        reasons.append(f"K={K} is not a multiple of 16 (16-byte cp.async rows)")
    if w_q.stride(1) != 1 or w_q.stride(0) % 16 or w_q.data_ptr() % 16:
        reasons.append(f"w_q rows are not contiguous and 16-byte aligned "
                       f"(strides {tuple(w_q.stride())})")
    return reasons


def _impl(op, backend, fwd, devices, dtypes, check=None):
    return register(Impl(op=op, backend=backend, forward=fwd, devices=frozenset(devices),
                         dtypes=frozenset(dtypes), check=check))


_F = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_I8 = (torch.int8,)

_impl("quantize_per_token", "torch", ref.quantize_per_token_op, {"cpu", "cuda"}, _F)
_impl("quantize_per_token", "triton", _triton_quantize, {"cuda"}, _HALF_FLOAT)
_impl("quantize_per_token", "cuda", _cuda_quantize, {"cuda"}, _HALF_FLOAT, _cuda_row_check)
_impl("quantize_per_token", "cpu", _cpu_quantize, {"cpu"}, (torch.float32,))

_impl("layernorm_quant", "torch", ref.layernorm_quant_op, {"cpu", "cuda"}, _F)
_impl("layernorm_quant", "triton", _triton_layernorm_quant, {"cuda"}, _HALF_FLOAT,
      _triton_row_check)
_impl("layernorm_quant", "cuda", _cuda_layernorm_quant, {"cuda"}, _HALF_FLOAT, _cuda_row_check)
_impl("layernorm_quant", "cpu", _cpu_layernorm_quant, {"cpu"}, (torch.float32,))

_impl("int8_matmul", "torch", ref.int8_matmul_op, {"cpu", "cuda"}, _I8)
_impl("int8_matmul", "triton", _triton_matmul, {"cuda"}, _I8, _triton_gemm_check)
_impl("int8_matmul", "cuda", _cuda_matmul, {"cuda"}, _I8, _cuda_gemm_check)
_impl("int8_matmul", "cpu", _cpu_matmul, {"cpu"}, _I8)

_impl("int8_linear", "torch", ref.int8_linear_op, {"cpu", "cuda"}, _F)
_impl("int8_linear", "triton", _triton_linear, {"cuda"}, _HALF_FLOAT)
_impl("int8_linear", "cuda", _cuda_linear, {"cuda"}, _HALF_FLOAT, _cuda_linear_check)
_impl("int8_linear", "cpu", _cpu_linear, {"cpu"}, (torch.float32,))

# Memory-bound row kernels: the CUDA ones first. GEMMs: Triton first, a guess (its Hopper path
# issues wgmma; the CUDA GEMM is mma.sync) until measured on the GPU.
for _op in ("quantize_per_token", "layernorm_quant"):
    _dispatch.set_priority(_op, ("cuda", "triton", "cpu", "torch"))
for _op in ("int8_matmul", "int8_linear"):
    _dispatch.set_priority(_op, ("triton", "cuda", "cpu", "torch"))
