"""Backend tables of the int8 ops: one :class:`Impl` per (op, backend), with its limits.

Canonical (dispatched) arguments, always 2-D (the op bodies flatten leading dims):
  quantize_per_token  (x (M, K),)
  layernorm_quant     (x (M, C), weight | None, bias | None, eps)
  int8_matmul         (a_q (M, K), b_q (N, K), a_scale (M, 1), b_scale (N,), bias | None,
                       out_dtype, activation "none" | "gelu" | "gelu_tanh")
  int8_linear         (x (M, K), w_q (N, K), w_scale (N,), bias | None, activation)
"""

from __future__ import annotations

import torch

from .._dispatch import FLOATS, GPU_FLOATS, declare, lazy, register
from ..reference import int8 as ref

# Triton's layernorm_quant keeps a whole row in registers.
TRITON_MAX_ROW = 16384
# The CUDA quantize / layernorm_quant kernels keep a row in registers (csrc/int8/int8_quant.cu).
CUDA_MAX_ROW = 8192


# ----------------------------------------------------------------------------------------------
# launchers that adapt arguments (the plain ones are lazy(module, name) below): Triton, the
# extension and numba load on first use
# ----------------------------------------------------------------------------------------------
_TRITON_QUANT = "xray_ops.kernels.int8_quant"
_TRITON_GEMM = "xray_ops.kernels.int8_gemm"
_CPU = "xray_ops.cpu.int8"
_triton_quantize = lazy(_TRITON_QUANT, "quantize_per_token")
_triton_gemm = lazy(_TRITON_GEMM, "int8_matmul")
_cuda_quantize_rows = lazy("xray_ops._C", "int8_quantize_per_token")
_cuda_gemm = lazy("xray_ops._C", "int8_matmul")
_cuda_layernorm_quant_rows = lazy("xray_ops._C", "int8_layernorm_quant")
_cpu_gemm = lazy(_CPU, "int8_matmul")
_cpu_linear = lazy(_CPU, "int8_linear")


def _gelu(activation: str) -> tuple[bool, bool]:
    """(gelu, tanh) flags of the kernels for an activation "none" | "gelu" | "gelu_tanh"."""
    return activation != "none", activation == "gelu_tanh"


def _triton_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    return _triton_gemm(a_q, b_q, a_scale, b_scale, bias, out_dtype, *_gelu(activation))


def _triton_linear(x, w_q, w_scale, bias, activation):
    x_q, x_scale = _triton_quantize(x)
    return _triton_gemm(x_q, w_q, x_scale, w_scale, bias, x.dtype, *_gelu(activation))


def _rows(x):
    # the CUDA kernels read rows with unit stride (16-byte vector loads when aligned)
    return x if x.stride(-1) == 1 else x.contiguous()


def _f32(t):
    return None if t is None else t.to(torch.float32).reshape(-1).contiguous()


def _cuda_quantize(x):
    return _cuda_quantize_rows(_rows(x))


def _cuda_layernorm_quant(x, weight, bias, eps):
    return _cuda_layernorm_quant_rows(_rows(x), _f32(weight), _f32(bias), eps)


def _cuda_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    return _cuda_gemm(a_q, b_q, _f32(a_scale), _f32(b_scale), _f32(bias), out_dtype,
                      *_gelu(activation))


def _cuda_linear(x, w_q, w_scale, bias, activation):
    x_q, x_scale = _cuda_quantize_rows(_rows(x))
    return _cuda_gemm(x_q, w_q, x_scale.reshape(-1), _f32(w_scale), _f32(bias), x.dtype,
                      *_gelu(activation))


def _cpu_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    return _cpu_gemm(a_q, b_q, a_scale, b_scale, bias, out_dtype, *_gelu(activation))


def _cpu_linear_act(x, w_q, w_scale, bias, activation):
    return _cpu_linear(x, w_q, w_scale, bias, *_gelu(activation))


# ----------------------------------------------------------------------------------------------
# per-input limits (checks get the op's inputs by name)
# ----------------------------------------------------------------------------------------------
def _row_check(limit: int, kernel: str):
    def check(inputs) -> list[str]:
        C = inputs.x.shape[-1]
        return [f"C={C} exceeds the {kernel} kernel's row limit {limit}"] if C > limit else []

    return check


_triton_row_check = _row_check(TRITON_MAX_ROW, "Triton")
_cuda_row_check = _row_check(CUDA_MAX_ROW, "CUDA")


def _triton_gemm_check(inputs) -> list[str]:
    # the Triton epilogue computes in float32: a float64 result would not be the float64
    # epilogue rounded once (the torch and cpu backends compute that)
    return [f"out_dtype {inputs.out_dtype}: the Triton epilogue computes in float32 (float64 "
            f"output: torch or cpu backend)"] if inputs.out_dtype == torch.float64 else []


def _cp_async_rows(name: str, t: torch.Tensor) -> list[str]:
    if t.numel() and (t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16):
        return [f"{name} rows are not contiguous and 16-byte aligned "
                f"(strides {tuple(t.stride())})"]
    return []


def _cuda_gemm_check(inputs) -> list[str]:
    K = inputs.a_q.shape[1]
    reasons = []
    if inputs.out_dtype not in GPU_FLOATS:
        reasons.append(f"out_dtype {inputs.out_dtype} not supported (float16, bfloat16, "
                       f"float32)")
    if K % 16:
        reasons.append(f"K={K} is not a multiple of 16 (16-byte cp.async rows)")
    return reasons + _cp_async_rows("a_q", inputs.a_q) + _cp_async_rows("b_q", inputs.b_q)


def _cuda_linear_check(inputs) -> list[str]:
    K = inputs.x.shape[1]
    reasons = _cuda_row_check(inputs)
    if K % 16:
        reasons.append(f"K={K} is not a multiple of 16 (16-byte cp.async rows)")
    return reasons + _cp_async_rows("w_q", inputs.w_q)


# ----------------------------------------------------------------------------------------------
# the tables. Memory-bound row kernels: the CUDA ones first. GEMMs: Triton first, a guess (its
# Hopper path issues wgmma; the CUDA GEMM is mma.sync) until measured on the GPU.
# ----------------------------------------------------------------------------------------------
_ROW_FIRST = ("cuda", "triton", "cpu", "torch")
_GEMM_FIRST = ("triton", "cuda", "cpu", "torch")
_I8 = (torch.int8,)
# The CUDA GEMM's cp.async and int8 mma.sync (m16n8k32) need sm_80 (below that its code
# compiles to nothing: a silent wrong answer). The row kernels are plain CUDA (warp shuffles,
# vector loads): Volta on.
_GEMM_CC = (8, 0)
_ROW_CC = (7, 0)

declare("quantize_per_token", forward=("x",), key="x", priority=_ROW_FIRST)
register("quantize_per_token", "torch", forward=ref.quantize_per_token_op, dtypes=FLOATS)
register("quantize_per_token", "triton", forward=_triton_quantize, dtypes=GPU_FLOATS)
register("quantize_per_token", "cuda", forward=_cuda_quantize, dtypes=GPU_FLOATS,
         min_compute_capability=_ROW_CC, forward_check=_cuda_row_check)
register("quantize_per_token", "cpu", forward=lazy(_CPU, "quantize_per_token"),
         dtypes=(torch.float32,))

declare("layernorm_quant", forward=("x", "weight", "bias", "eps"), key="x", priority=_ROW_FIRST)
register("layernorm_quant", "torch", forward=ref.layernorm_quant_op, dtypes=FLOATS)
register("layernorm_quant", "triton", forward=lazy(_TRITON_QUANT, "layernorm_quant"),
         dtypes=GPU_FLOATS, forward_check=_triton_row_check)
register("layernorm_quant", "cuda", forward=_cuda_layernorm_quant, dtypes=GPU_FLOATS,
         min_compute_capability=_ROW_CC, forward_check=_cuda_row_check)
register("layernorm_quant", "cpu", forward=lazy(_CPU, "layernorm_quant"),
         dtypes=(torch.float32,))

declare("int8_matmul", forward=("a_q", "b_q", "a_scale", "b_scale", "bias", "out_dtype",
                                "activation"), key="a_q", priority=_GEMM_FIRST)
register("int8_matmul", "torch", forward=ref.int8_matmul_op, dtypes=_I8)
register("int8_matmul", "triton", forward=_triton_matmul, dtypes=_I8,
         forward_check=_triton_gemm_check)
register("int8_matmul", "cuda", forward=_cuda_matmul, dtypes=_I8,
         min_compute_capability=_GEMM_CC, forward_check=_cuda_gemm_check)
register("int8_matmul", "cpu", forward=_cpu_matmul, dtypes=_I8)

declare("int8_linear", forward=("x", "w_q", "w_scale", "bias", "activation"), key="x",
        priority=_GEMM_FIRST)
register("int8_linear", "torch", forward=ref.int8_linear_op, dtypes=FLOATS)
register("int8_linear", "triton", forward=_triton_linear, dtypes=GPU_FLOATS)
register("int8_linear", "cuda", forward=_cuda_linear, dtypes=GPU_FLOATS,
         min_compute_capability=_GEMM_CC, forward_check=_cuda_linear_check)
register("int8_linear", "cpu", forward=_cpu_linear_act, dtypes=(torch.float32,))
