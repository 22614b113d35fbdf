"""Int8 inference ops: the definitions, in int64 / float64 PyTorch.

These are the ops' definitions and test oracle, and the ``torch`` backend. Every backend is
held to them.

Per-token (per-row) symmetric quantization, :func:`quantize_per_token`:
  absmax = max_j |x[..., j]|                           (exact)
  scale  = float32(absmax / 127)                       (one correctly rounded division)
           an all-zero row (or one whose absmax / 127 underflows float32 to 0) gets scale 1.0,
           so its scale is finite and it dequantizes to exact zeros
  q      = clamp(round_half_to_even(x / scale), -127, 127)   (the quotient taken exactly)
  Non-finite rows are not hidden: a row holding NaN gets scale NaN, a row holding ±Inf gets
  scale +Inf; their q is 0 wherever x / scale is NaN (so a later int8_matmul turns the row's
  output into NaN / Inf rather than a plausible number).
  A finite row whose absmax / 127 exceeds float32 (float64 input only, e.g. a row of 1e300)
  has no float32 scale: ValueError rather than an Inf scale that dequantizes to NaN.
  The kernels compute x / scale as an IEEE float32 division (correctly rounded), so they may
  differ from this definition by 1 LSB, and only where that float32 quotient is exactly an
  integer + 0.5 while the exact one is not (the float32 rounding of the quotient created the tie
  and round-half-to-even then goes the other way).

int8 GEMM, :func:`int8_matmul` (nn.Linear weight layout):
  acc = a_q @ b_qᵀ, exact (integers; float64 holds the sums of int8 products exactly for any
        K < 2**39, and the int32 accumulators of the kernels are exact for K <= 131071)
  y   = acc · a_scale · b_scale (+ bias)  (→ GELU, the exact erf form 0.5·y·(1 + erf(y/√2)))
  in float64, rounded once to out_dtype.
"""

from __future__ import annotations


import torch

from .bias_gelu import gelu

QMAX = 127


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_scale_fits_float32(absmax: torch.Tensor, name: str) -> None:
    """ValueError if a finite row's absmax / 127 exceeds float32 (only float64 input can): its
    float32 scale would be Inf, its x_q zeros, and its dequantized value NaN."""
    big = torch.isfinite(absmax) & (absmax / QMAX > FLOAT32_MAX)
    if bool(big.any()):
        worst = float(absmax[big].max())
        raise ValueError(
            f"{name}: expected finite rows with max |value| <= 127 * {FLOAT32_MAX:.4g} (the "
            f"per-token scale is float32), got a row with max |value| {worst:.4g}; "
            f"scale it down first")


def quantize_per_token(x: torch.Tensor, name: str = "x"):
    """x (..., K) float -> (q (..., K) int8, scale (..., 1) float32). See the module docstring.

    ValueError (naming ``name``) for a finite float64 row too large for a float32 scale.
    """
    x64 = x.detach().to(torch.float64)
    absmax = x64.abs().amax(dim=-1, keepdim=True)  # NaN propagates; +Inf for a row with ±Inf
    if x.dtype == torch.float64:  # narrower floats cannot overflow a float32 scale
        check_scale_fits_float32(absmax, name)
    # float64 division then one rounding to float32 == the correctly rounded float32 quotient
    # (double rounding is innocuous for a float32 division: 53 >= 2·24 + 2)
    scale = (absmax / QMAX).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    v = x64 / scale.to(torch.float64)  # exact enough: a float64 quotient of two float32 values
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    q = torch.round(v).clamp_(-QMAX, QMAX)  # torch.round: half to even
    return q.to(torch.int8), scale


def layer_norm64(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in float64 (biased variance, like torch.nn.LayerNorm)."""
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(-1, keepdim=True)
    var = (x64 - mean).square().mean(-1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.detach().to(torch.float64)
    if bias is not None:
        y = y + bias.detach().to(torch.float64)
    return y


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float):
    """x (..., C) -> (q (..., C) int8, scale (..., 1) float32): quantize_per_token(LayerNorm(x)).

    The LayerNorm is taken exactly (float64), not rounded to x's dtype before quantizing; the
    kernels compute it in float32, so values within float32 rounding of a .5 tie may land 1 LSB
    apart (see tests/test_int8_ops.py).
    """
    return quantize_per_token(layer_norm64(x, weight, bias, eps), "LayerNorm(x)")


def int8_accumulate(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """a_q (M, K) int8, b_q (N, K) int8 -> a_q @ b_qᵀ as float64 (exact integers)."""
    return a_q.to(torch.float64) @ b_q.to(torch.float64).T


def gelu64(y: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The GELU of bias_gelu (xray_ops.reference.bias_gelu.gelu): exact 0.5·y·(1 + erf(y/√2)),
    or the tanh approximation."""
    return gelu(y, approximate)


def int8_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """float64 acc (M, N) -> acc · a_scale (M, 1) · b_scale (N,) (+ bias) (→ GELU), float64."""
    y = acc * a_scale.to(torch.float64).reshape(-1, 1) * b_scale.to(torch.float64).reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(1, -1)
    if activation in ("gelu", "gelu_tanh"):
        y = gelu64(y, "tanh" if activation == "gelu_tanh" else "none")
    return y


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor,
                b_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, activation: str | None = None):
    """(M, K) int8, (N, K) int8, (M, 1), (N,) [, (N,)] -> (M, N) out_dtype. See the module doc."""
    acc = int8_accumulate(a_q, b_q)
    return int8_epilogue(acc, a_scale, b_scale, bias, activation).to(out_dtype)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, activation: str | None = None):
    """x (..., K) float -> (..., N) in x.dtype: per-token quantization of x, then int8_matmul."""
    K = x.shape[-1]
    x_q, x_scale = quantize_per_token(x.reshape(-1, K))
    y = int8_matmul(x_q, w_q, x_scale, w_scale, bias, x.dtype, activation)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def quantize_weight(weight: torch.Tensor):
    """(N, K) float -> (w_q (N, K) int8, w_scale (N,) float32): per-output-channel symmetric."""
    w_q, w_scale = quantize_per_token(weight, "weight")
    return w_q, w_scale.reshape(-1)


# ----------------------------------------------------------------------------------------------
# the torch backend: the definitions, shaped like the dispatched ops
# ----------------------------------------------------------------------------------------------
def quantize_per_token_op(x: torch.Tensor):
    q, s = quantize_per_token(x)
    return q.contiguous(), s.contiguous()


def layernorm_quant_op(x, weight, bias, eps):
    q, s = layernorm_quant(x, weight, bias, eps)
    return q.contiguous(), s.contiguous()


def int8_matmul_op(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation):
    return int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation).contiguous()


def int8_linear_op(x, w_q, w_scale, bias, activation):
    return int8_linear(x, w_q, w_scale, bias, activation).contiguous()
