"""The cpu backend of the int8 ops: numba row kernels around ``torch._int_mm``.

torch._int_mm runs int8 x int8 -> int32 GEMMs on the CPU (oneDNN, VNNI where the CPU has it:
about 4x an fp32 GEMM of the same shape on AVX-512 machines). Around it numba does, in one
pass each:
  - quantize_per_token / layernorm_quant: read x once, write x_q and the row scales;
  - the epilogue: read the int32 accumulator once and write acc · a_scale · b_scale (+ bias)
    (→ GELU) as float32 into the same buffer (no second allocation).

The kernels use error_model="numpy" (no ZeroDivisionError checks): the checks' branches keep
LLVM from vectorizing the loops (measured: GELU epilogue 6x slower with them).

Threads: the kernels run on the calling thread, and the GEMM on torch's threads. After every
torch op torch's OpenMP workers spin-wait for milliseconds (libgomp's default), so a second
thread of ours would fight one of them for a core: measured on the 2-core machine, quantizing
1576 x 1536 took 1.7-2.0 ms on one thread and a median 5-8 ms on two right after a torch op
(and two threads were no faster than one on a quiet pass: these passes are memory-bound).
numba's parallel=True is no way out: its OpenMP layer is a second libgomp spinning beside
torch's, its workqueue layer aborts when two Python threads enter it at once.

The row absmax is an integer max over the float32 bit patterns with the sign cleared (the
integer order of non-negative floats is their float order, and NaNs sort above +Inf): it
vectorizes, where a float max with NaN checks does not (3x faster quantization of a ViT-S
fc2 input).

GELU is the one of bias_gelu (:mod:`xray_ops.cpu.gelu`): a rational approximation of erf in
float32 (Eigen's; max abs error 4.5e-7 over the reals, against 3e-8 for torch's float32 erf)
because libm's erf does not vectorize, or the tanh form on a vectorizable exp.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from ..reference import int8 as ref
from .gelu import gelu as _gelu

_QMAX = np.float32(127.0)


@numba.njit(inline="always")
def _quantize_value(v, scale):
    r = v / scale  # float32 / float32: the IEEE quotient, as in the other backends
    r = np.float32(0.0) if r != r else r  # NaN row, or Inf / Inf
    r = _QMAX if r > _QMAX else r  # selects, not min/max: they vectorize
    r = -_QMAX if r < -_QMAX else r
    return np.int8(np.rint(r))  # rint: round half to even


_ABS_BITS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)


@numba.njit(inline="always")
def _scale_from_bits(absmax_bits, bits1, float1):
    """The row scale from the largest |x| as float32 bits: NaN (bits above +Inf's) -> NaN,
    else absmax / 127 with an all-zero row -> 1. bits1 / float1: a 1-element int32 array and
    its float32 view (the bit pattern back to a float)."""
    if absmax_bits > _INF_BITS:
        return np.float32(np.nan)
    bits1[0] = absmax_bits
    s = np.float32(float1[0] / _QMAX)
    return np.float32(1.0) if s == 0 else s


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _quantize_rows(x, xbits, q, s, r0, r1):
    # The row's absmax as an integer max of the float32 bit patterns with the sign cleared:
    # for non-negative floats the integer order is the float order, and every NaN sorts above
    # +Inf, so one vectorized integer reduction gives both (a float max with NaN checks does
    # not vectorize without fast-math flags). xbits is x viewed as int32 (float32 x).
    K = x.shape[1]
    bits1 = np.empty(1, dtype=np.int32)
    float1 = bits1.view(np.float32)
    for i in range(r0, r1):
        m = np.int32(0)
        for j in range(K):
            a = xbits[i, j] & _ABS_BITS
            m = a if a > m else m
        scale = _scale_from_bits(m, bits1, float1)
        s[i, 0] = scale
        for j in range(K):
            q[i, j] = _quantize_value(x[i, j], scale)


@numba.njit(nogil=True, error_model="numpy", fastmath={"reassoc"})
def _row_mean_var(x, i):
    # float64 sums; reassoc lets LLVM vectorize the reductions (fixed order per build: the
    # result is deterministic)
    C = x.shape[1]
    mean = 0.0
    for j in range(C):
        mean += x[i, j]
    mean /= C
    var = 0.0
    for j in range(C):
        d = x[i, j] - mean
        var += d * d
    return mean, var / C


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _layernorm_quant_rows(x, w, b, has_w, has_b, eps, q, s, r0, r1):
    C = x.shape[1]
    y = np.empty(C, dtype=np.float32)
    ybits = y.view(np.int32)
    bits1 = np.empty(1, dtype=np.int32)
    float1 = bits1.view(np.float32)
    for i in range(r0, r1):
        mean, var = _row_mean_var(x, i)
        rstd = np.float32(1.0 / np.sqrt(var + eps))
        mean32 = np.float32(mean)
        for j in range(C):
            y[j] = (np.float32(x[i, j]) - mean32) * rstd
        if has_w:
            for j in range(C):
                y[j] = y[j] * w[j]
        if has_b:
            for j in range(C):
                y[j] = y[j] + b[j]
        m = np.int32(0)  # absmax as bits, as in _quantize_rows
        for j in range(C):
            a = ybits[j] & _ABS_BITS
            m = a if a > m else m
        scale = _scale_from_bits(m, bits1, float1)
        s[i, 0] = scale
        for j in range(C):
            q[i, j] = _quantize_value(y[j], scale)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _epilogue_rows(acc, out, a_s, b_s, bias, has_bias, gelu, tanh, r0, r1):
    # acc (M, N) int32 and out (M, N) float32 may be the same memory: element (i, j) is read
    # before it is written, by the same thread. One branch-free loop per step: they vectorize.
    N = acc.shape[1]
    for i in range(r0, r1):
        sa = np.float32(a_s[i])
        if has_bias:
            for j in range(N):
                out[i, j] = np.float32(acc[i, j]) * sa * b_s[j] + bias[j]
        else:
            for j in range(N):
                out[i, j] = np.float32(acc[i, j]) * sa * b_s[j]
        if gelu and tanh:  # the GELU of bias_gelu (xray_ops/cpu/gelu.py)
            for j in range(N):
                out[i, j] = _gelu(out[i, j], True)
        elif gelu:
            for j in range(N):
                out[i, j] = _gelu(out[i, j], False)


# ----------------------------------------------------------------------------------------------
# launchers: every kernel runs on the calling thread over rows [0, M) (module doc: Threads)
# ----------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    # a strided (even stride-0) numpy view of the same memory: no copy
    return t.detach().numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).reshape(-1).contiguous().numpy()


def quantize_per_token(x: torch.Tensor):
    """x (M, K) float32 -> (x_q (M, K) int8, scale (M, 1) float32)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8)
    s = torch.empty(M, 1, dtype=torch.float32)
    if M:
        _quantize_rows(_np(x), _np(x.view(torch.int32)), q.numpy(), s.numpy(), 0, M)
    return q, s


def layernorm_quant(x, weight, bias, eps):
    """x (M, C) float32 -> (x_q (M, C) int8, scale (M, 1) float32) of LayerNorm(x)."""
    M, C = x.shape
    q = torch.empty(M, C, dtype=torch.int8)
    s = torch.empty(M, 1, dtype=torch.float32)
    if M:
        dummy = np.zeros(1, dtype=np.float32)
        w = _f32(weight) if weight is not None else dummy
        b = _f32(bias) if bias is not None else dummy
        _layernorm_quant_rows(_np(x), w, b, weight is not None, bias is not None, float(eps),
                              q.numpy(), s.numpy(), 0, M)
    return q, s


def _gemm_epilogue(acc: torch.Tensor, a_scale, b_scale, bias, out_dtype, gelu, tanh):
    if out_dtype == torch.float64:
        # the definition's float64 epilogue, as is (a float32 one would round before the end)
        return ref.int8_epilogue(acc.to(torch.float64), a_scale, b_scale, bias,
                                 ("gelu_tanh" if tanh else "gelu") if gelu else None)
    M, N = acc.shape
    out = acc.view(torch.float32)  # written in place over the int32 accumulator
    if M and N:
        b_s = _f32(b_scale)
        _epilogue_rows(acc.numpy(), out.numpy(), _f32(a_scale), b_s,
                       _f32(bias) if bias is not None else b_s, bias is not None, gelu, tanh,
                       0, M)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t (R, K), K >= 2, as a matrix whose strides say "row-major" unambiguously: (s, 1), s >= K.

    torch._int_mm on the CPU (oneDNN) tells row- from column-major by the strides alone, and
    reads a matrix whose strides are both 1 (a (1, K) row taken as a transposed column, say)
    the wrong way round: garbage, not an error. Anything else it might misread is copied too.
    """
    R, K = t.shape
    if t.stride(1) == 1 and t.stride(0) >= K:
        return t
    return torch.empty_strided((R, K), (K, 1), dtype=t.dtype).copy_(t)


def _accumulate(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """a_q (M, K) int8 @ b_q (N, K) int8 ᵀ -> (M, N) int32, exact and contiguous."""
    if a_q.shape[1] == 1:
        # K == 1: an outer product. _int_mm misreads the (1, N) right operand, whose strides
        # are (1, 1) whatever b_q's are, and there is no layout of it that says otherwise
        return a_q.to(torch.int32) * b_q.to(torch.int32).t()
    return torch._int_mm(_row_major(a_q), _row_major(b_q).t()).contiguous()


def int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, gelu, tanh=False):
    """(M, K) int8, (N, K) int8, (M, 1), (N,), (N,) | None -> (M, N) out_dtype."""
    acc = _accumulate(a_q, b_q)
    return _gemm_epilogue(acc, a_scale, b_scale, bias, out_dtype, gelu, tanh)


def int8_linear(x, w_q, w_scale, bias, gelu, tanh=False):
    """x (M, K) float32 -> (M, N) float32: numba quantization, _int_mm, numba epilogue."""
    x_q, x_scale = quantize_per_token(x)
    acc = _accumulate(x_q, w_q)
    return _gemm_epilogue(acc, x_scale, w_scale, bias, x.dtype, gelu, tanh)
