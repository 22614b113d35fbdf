"""Int8 inference ops: validation and torch.library registration.

Public: :func:`quantize_per_token`, :func:`layernorm_quant`, :func:`int8_matmul`,
:func:`int8_linear`. The definitions live in :mod:`xray_ops.reference.int8`; the backend
tables in :mod:`xray_ops.ops.int8_backends`; the kernels in ``xray_ops.kernels.int8_quant`` /
``int8_gemm`` (Triton), ``csrc/int8/`` (CUDA) and :mod:`xray_ops.cpu.int8` (numba + _int_mm).

These are inference ops: they have no autograd. Called with grad mode on and an input that
requires grad they raise a RuntimeError (run them under ``torch.no_grad()`` /
``torch.inference_mode()``, or detach).
"""

from __future__ import annotations

import torch

from .. import _dispatch, _validate
from .._dtypes import FLOATS, GPU_FLOATS
from . import int8_backends  # noqa: F401  (registers the Impls)

_SCALE_DTYPES = GPU_FLOATS
_OUT_DTYPES = FLOATS
# int32 accumulation is exact while K · 128 · 128 < 2**31
MAX_K = 131071
# the GELU of bias_gelu (xray_ops.reference.bias_gelu): exact (erf) or its tanh approximation
ACTIVATIONS = (None, "gelu", "gelu_tanh")


def _inference_only(op: str, **tensors) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{name}: {op} is an inference op without autograd, got a tensor that requires "
                f"grad; call it under torch.no_grad() or torch.inference_mode(), or pass "
                f"{name}.detach()")


def _activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected None, 'gelu' or 'gelu_tanh', got {activation!r}")
    return activation or "none"


def _features(t: torch.Tensor, name: str) -> int:
    K = t.shape[-1]
    if K < 1:
        raise ValueError(f"{name}: expected at least 1 feature in the last dim, "
                         f"got shape {tuple(t.shape)}")
    return K


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def quantize_per_token(x: torch.Tensor):
    """Symmetric per-token (per-row) int8 quantization.

    Args:
        x: (..., K) float (float16, bfloat16, float32, float64), K >= 1, any strides.

    Returns:
        x_q: (..., K) int8 = clamp(round_half_even(x / scale), -127, 127).
        scale: (..., 1) float32 = absmax over the row / 127; an all-zero row gets scale 1.0
            (finite; it dequantizes to zeros). A row holding NaN gets scale NaN (Inf: +Inf).
            A finite float64 row too large for a float32 scale (max |x| > 127 · 3.4e38):
            ValueError.

    Inference only (no autograd). Equivalent PyTorch::

        scale = (x.double().abs().amax(-1, keepdim=True) / 127).float()
        scale = torch.where(scale == 0, 1.0, scale)
        x_q = torch.round(x.double() / scale).clamp(-127, 127).to(torch.int8)
    """
    _validate.tensor(x, "x", floating=True)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least a 1-D tensor, got shape {tuple(x.shape)}")
    _features(x, "x")
    _inference_only("quantize_per_token", x=x)
    return torch.ops.xray_ops.quantize_per_token(x, _dispatch.requested_backend())


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float = 1e-5):
    """LayerNorm over the last dim with its output quantized per token in the same pass.

    The input of qkv and fc1 in a quantized ViT block: x is read once, the normalized row never
    goes to memory in float.

    Args:
        x: (..., C) float, C >= 1, any strides.
        weight, bias: (C,) float or None (like ``nn.LayerNorm(elementwise_affine=False)``).
        eps: > 0.

    Returns:
        (x_q (..., C) int8, scale (..., 1) float32) = quantize_per_token(LayerNorm(x)), the
        LayerNorm computed in float32 by the kernels (float64 by the reference).

    Inference only (no autograd). Equivalent PyTorch::

        xray_ops.quantize_per_token(
            torch.nn.functional.layer_norm(x.float(), (C,), weight, bias, eps))
    """
    _validate.tensor(x, "x", floating=True)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least a 1-D tensor, got shape {tuple(x.shape)}")
    C = _features(x, "x")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _validate.tensor(t, name, ndim=1, floating=True)
            _validate.shape(t, name, (C,), f"(C,) for x of shape {tuple(x.shape)}")
    _validate.same_device("x", x, weight=weight, bias=bias)
    eps = _validate.number(eps, "eps", lo=0.0, lo_open=True)
    _inference_only("layernorm_quant", x=x, weight=weight, bias=bias)
    return torch.ops.xray_ops.layernorm_quant(x, weight, bias, eps, _dispatch.requested_backend())


def int8_matmul(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor,
                b_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, activation: str | None = None):
    """int8 GEMM with exact int32 accumulation and a fused dequantize / bias / GELU epilogue.

    Args:
        a_q: (M, K) int8 (activations, e.g. from :func:`quantize_per_token`).
        b_q: (N, K) int8, nn.Linear's weight layout (out_features, in_features).
        a_scale: (M, 1) float (float16, bfloat16, float32), per-row scale of a_q.
        b_scale: (N,) float, per-output-channel scale of b_q.
        bias: (N,) float or None.
        out_dtype: float16, bfloat16, float32 (float64: torch and cpu backends, the epilogue
            then in float64); None means bfloat16 on the GPU, else the (promoted) dtype of
            the scales.
        activation: None, "gelu" (the exact erf form) or "gelu_tanh" (the tanh approximation):
            the GELU of :func:`xray_ops.bias_gelu`.

    Returns:
        (M, N) out_dtype: y = (a_q @ b_qᵀ) · a_scale · b_scale (+ bias) (→ GELU), accumulated
        exactly in int32 (K <= 131071), the epilogue in float32 (float64 for a float64
        out_dtype), rounded once to out_dtype.

    Inference only (no autograd). Equivalent PyTorch::

        acc = torch._int_mm(a_q, b_q.t())              # exact int32
        y = acc.float() * a_scale * b_scale + bias     # then gelu, .to(out_dtype)
    """
    _validate.tensor(a_q, "a_q", ndim=2, dtypes=(torch.int8,))
    _validate.tensor(b_q, "b_q", ndim=2, dtypes=(torch.int8,))
    M, K = a_q.shape
    N = b_q.shape[0]
    if b_q.shape[1] != K:
        raise ValueError(f"b_q: expected shape ({N}, {K}) (N, K) with K = a_q.shape[1] = {K}, "
                         f"got {tuple(b_q.shape)}")
    if K < 1 or K > MAX_K:
        raise ValueError(f"a_q: expected K (a_q.shape[1]) in [1, {MAX_K}] (int32 accumulation "
                         f"is exact up to K = {MAX_K}), got shape {tuple(a_q.shape)}")
    _validate.tensor(a_scale, "a_scale", dtypes=_SCALE_DTYPES)
    _validate.shape(a_scale, "a_scale", (M, 1), f"(M, 1) for a_q of shape {tuple(a_q.shape)}")
    _validate.tensor(b_scale, "b_scale", dtypes=_SCALE_DTYPES)
    _validate.shape(b_scale, "b_scale", (N,), f"(N,) for b_q of shape {tuple(b_q.shape)}")
    if bias is not None:
        _validate.tensor(bias, "bias", dtypes=FLOATS)
        _validate.shape(bias, "bias", (N,), f"(N,) for b_q of shape {tuple(b_q.shape)}")
    _validate.same_device("a_q", a_q, b_q=b_q, a_scale=a_scale, b_scale=b_scale, bias=bias)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if a_q.device.type == "cuda" \
            else torch.promote_types(a_scale.dtype, b_scale.dtype)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype: expected float16, bfloat16, float32 or float64, "
                        f"got {out_dtype}")
    act = _activation(activation)
    _inference_only("int8_matmul", a_scale=a_scale, b_scale=b_scale, bias=bias)
    return torch.ops.xray_ops.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype, act,
                                          _dispatch.requested_backend())


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, activation: str | None = None):
    """nn.Linear with int8 weights and per-token dynamic int8 activations.

    x is read once: the per-token quantization runs in one pass over x (a kernel that writes
    x_q and the scales), then the int8 GEMM with the fused epilogue.

    Args:
        x: (..., K) float (float16, bfloat16, float32; float64 on the torch backend), any
            leading dims, any strides.
        w_q: (N, K) int8, per-output-channel symmetric (see ``xray_ops.nn.Int8Linear``).
        w_scale: (N,) float.
        bias: (N,) float or None.
        activation: None, "gelu" or "gelu_tanh".

    Returns:
        (..., N) in x.dtype.

    Inference only (no autograd). Equivalent PyTorch::

        x_q, x_scale = xray_ops.quantize_per_token(x.reshape(-1, K))
        y = xray_ops.int8_matmul(x_q, w_q, x_scale, w_scale, bias, x.dtype, activation)
        y = y.reshape(*x.shape[:-1], N)
    """
    _validate.tensor(x, "x", floating=True)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least a 1-D tensor, got shape {tuple(x.shape)}")
    _validate.tensor(w_q, "w_q", ndim=2, dtypes=(torch.int8,))
    N, K = w_q.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected {K} features in the last dim (w_q is {tuple(w_q.shape)} "
                         f"(N, K)), got shape {tuple(x.shape)}")
    if K < 1 or K > MAX_K:
        raise ValueError(f"w_q: expected K in [1, {MAX_K}], got shape {tuple(w_q.shape)}")
    _validate.tensor(w_scale, "w_scale", dtypes=_SCALE_DTYPES)
    _validate.shape(w_scale, "w_scale", (N,), f"(N,) for w_q of shape {tuple(w_q.shape)}")
    if bias is not None:
        _validate.tensor(bias, "bias", dtypes=FLOATS)
        _validate.shape(bias, "bias", (N,), f"(N,) for w_q of shape {tuple(w_q.shape)}")
    _validate.same_device("x", x, w_q=w_q, w_scale=w_scale, bias=bias)
    act = _activation(activation)
    _inference_only("int8_linear", x=x, w_scale=w_scale, bias=bias)
    return torch.ops.xray_ops.int8_linear(x, w_q, w_scale, bias, act,
                                          _dispatch.requested_backend())


# ----------------------------------------------------------------------------------------------
# torch.library registration: the op bodies flatten leading dims, so backends see 2-D tensors
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    q, s = _dispatch.run("quantize_per_token", backend, x=x.reshape(-1, K))
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@_quantize_per_token_op.register_fake
def _(x, backend):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device))


@torch.library.custom_op("xray_ops::layernorm_quant", mutates_args=())
def _layernorm_quant_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    q, s = _dispatch.run("layernorm_quant", backend, x=x.reshape(-1, C), weight=weight,
                         bias=bias, eps=eps)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


@_layernorm_quant_op.register_fake
def _(x, weight, bias, eps, backend):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device))


@torch.library.custom_op("xray_ops::int8_matmul", mutates_args=())
def _int8_matmul_op(a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor,
                    b_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                    activation: str, backend: str) -> torch.Tensor:
    return _dispatch.run("int8_matmul", backend, a_q=a_q, b_q=b_q, a_scale=a_scale,
                         b_scale=b_scale, bias=bias, out_dtype=out_dtype, activation=activation)


@_int8_matmul_op.register_fake
def _(a_q, b_q, a_scale, b_scale, bias, out_dtype, activation, backend):
    return torch.empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype, device=a_q.device)


@torch.library.custom_op("xray_ops::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, activation: str, backend: str) -> torch.Tensor:
    K = x.shape[-1]
    y = _dispatch.run("int8_linear", backend, x=x.reshape(-1, K), w_q=w_q, w_scale=w_scale,
                      bias=bias, activation=activation)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


@_int8_linear_op.register_fake
def _(x, w_q, w_scale, bias, activation, backend):
    return torch.empty(*x.shape[:-1], w_q.shape[0], dtype=x.dtype, device=x.device)
