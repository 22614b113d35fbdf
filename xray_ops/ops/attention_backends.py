"""Backend tables of flash attention: one implementation per (op, backend), with its limits.

Dispatched inputs, by name (the packed entry point dispatches ``flash_attention`` on strided
views of its qkv):

  flash_attention          forward  (q, k, v, key_bias, scale, causal, want_cls)
                                    -> (out, cls_attn or None, lse)
                           backward (dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out,
                                     lse, scale, causal, dq, dk, dv)
                                    -> dkey_bias or None; writes dq, dk, dv (any strides)
  flash_attention_varlen   the same with (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k) after v

dout is never None (zeros when out is unused); dcls / dlse are None when no gradient arrives
there; key_bias_grad says whether dkey_bias is wanted (a backend may return it regardless).
The kernels: ``xray_ops.kernels.flash_attention`` / ``flash_attention_bwd`` (Triton),
``csrc/flash_attn/`` (CUDA forward; its CLS row and backward are the Triton kernels) and
:mod:`xray_ops.cpu.attention` (PyTorch's CPU flash kernel).
"""

from __future__ import annotations

import torch

from .._dispatch import (FLOATS, GPU_FLOATS, HALF_FLOATS, TORCH, TRITON, cuda_extension, declare,
                         lazy, register, requires)
from ..reference import attention as ref

OP = "flash_attention"
OP_VARLEN = "flash_attention_varlen"
# head dims the Triton kernels take: D as one or two power-of-two chunks of >= 16
TRITON_HEAD_DIMS = (16, 256)
# head dims of the CUDA forward (csrc/flash_attn)
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
_INT32_MAX = 2**31 - 1
_VARLEN_META = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


# ----------------------------------------------------------------------------------------------
# torch: the reference in float32 for 16-bit inputs (as the kernels accumulate)
# ----------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t, dtype):
    return t.to(dtype) if t is not None else None


def _torch_forward(q, k, v, key_bias, scale, causal, want_cls):
    acc = _acc_dtype(q.dtype)
    o, cls, lse = ref.attention(q.to(acc), k.to(acc), v.to(acc), scale, _up(key_bias, acc),
                                causal)
    B, H, Nq, D = q.shape
    out = q.new_empty(B, Nq, H, D).transpose(1, 2)  # the op's (B, Nq, H, D) storage
    out.copy_(o)
    return out, (cls.to(q.dtype) if want_cls else None), lse.float()


def _torch_backward(dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out, lse, scale,
                    causal, dq, dk, dv):
    acc = _acc_dtype(q.dtype)
    gq, gk, gv, gb = ref.attention_backward(
        _up(dout, acc), _up(dcls, acc), _up(dlse, acc), q.to(acc), k.to(acc), v.to(acc), scale,
        _up(key_bias, acc), causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)
    return gb.to(key_bias.dtype) if key_bias is not None else None


def _torch_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, key_bias, scale, causal,
                          want_cls):
    acc = _acc_dtype(q.dtype)
    o, cls, lse = ref.attention_varlen(q.to(acc), k.to(acc), v.to(acc), cu_q, cu_k, scale,
                                       _up(key_bias, acc), causal)
    return o.to(q.dtype), (cls.to(q.dtype) if want_cls else None), lse.float()


def _torch_backward_varlen(dout, dcls, dlse, q, k, v, cu_q, cu_k, max_q, max_k, key_bias,
                           key_bias_grad, out, lse, scale, causal, dq, dk, dv):
    acc = _acc_dtype(q.dtype)
    gq, gk, gv, gb = ref.attention_varlen_backward(
        _up(dout, acc), _up(dcls, acc), _up(dlse, acc), q.to(acc), k.to(acc), v.to(acc), cu_q,
        cu_k, scale, _up(key_bias, acc), causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)
    return gb.to(key_bias.dtype) if key_bias is not None else None


# ----------------------------------------------------------------------------------------------
# triton and cuda launchers (the kernels' argument order; imported on first use)
# ----------------------------------------------------------------------------------------------
_triton_fwd = lazy("xray_ops.kernels.flash_attention", "flash_attention_forward")
_triton_cls = lazy("xray_ops.kernels.flash_attention", "cls_attn_forward")
_triton_bwd = lazy("xray_ops.kernels.flash_attention_bwd", "flash_attention_backward")
_cuda_fwd = lazy("xray_ops._C", "flash_attention_forward")


def _triton_forward(q, k, v, key_bias, scale, causal, want_cls):
    return _triton_fwd(q, k, v, key_bias, scale, causal, want_cls)


def _triton_backward(dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out, lse, scale,
                     causal, dq, dk, dv):
    return _triton_bwd(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, dq, dk, dv)


def _triton_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, key_bias, scale, causal,
                           want_cls):
    return _triton_fwd(q, k, v, key_bias, scale, causal, want_cls, cu_seqlens_q=cu_q,
                       cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


def _triton_backward_varlen(dout, dcls, dlse, q, k, v, cu_q, cu_k, max_q, max_k, key_bias,
                            key_bias_grad, out, lse, scale, causal, dq, dk, dv):
    return _triton_bwd(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, dq, dk, dv,
                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                       max_seqlen_k=max_k)


def _cuda_forward(q, k, v, key_bias, scale, causal, want_cls):
    bias32 = key_bias.float() if key_bias is not None else None  # the extension reads fp32
    # the extension writes (B, Nq, H, D) storage seen as (B, H, Nq, D), like the Triton path
    out, lse = _cuda_fwd(q, k, v, bias32, scale, causal)
    cls = _triton_cls(q, k, key_bias, lse, scale, causal) if want_cls else None
    return out, cls, lse


# ----------------------------------------------------------------------------------------------
# per-input limits (checks get the inputs by name)
# ----------------------------------------------------------------------------------------------
def _int32_offsets_reasons(*tensors) -> list[str]:
    """The Triton kernels index within one (batch, head) with 32-bit offsets."""
    for t in tensors:
        if t is None:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape[-2:], t.stride()[-2:]))
        if t.dim() == 3:  # varlen (T, H, D): the token stride spans the whole batch
            span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if span > _INT32_MAX:
            return [f"a tensor of shape {tuple(t.shape)} spans {span} elements within one "
                    f"head, beyond the kernels' 32-bit offsets"]
    return []


def _triton_reasons(q, k, v, out_grads=()) -> list[str]:
    reasons = []
    D = q.shape[-1]
    lo, hi = TRITON_HEAD_DIMS
    if not lo <= D <= hi:
        reasons.append(f"head dim {D} not supported (supports {lo} <= D <= {hi})")
    return reasons + _int32_offsets_reasons(q, k, v, *out_grads)


def triton_forward_check(i) -> list[str]:
    return _triton_reasons(i.q, i.k, i.v)


def triton_backward_check(i) -> list[str]:
    return _triton_reasons(i.q, i.k, i.v, out_grads=(i.dout, i.dq, i.dk, i.dv))


def cuda_forward_check(i) -> list[str]:
    reasons = []
    D = i.q.shape[-1]
    if D not in CUDA_HEAD_DIMS:
        reasons.append(f"head dim {D} not supported (supports {list(CUDA_HEAD_DIMS)})")
    for name in ("q", "k", "v"):
        t = getattr(i, name)
        if t.stride(-1) != 1:
            reasons.append(f"{name} needs stride(-1) == 1, got strides {tuple(t.stride())}")
    return reasons


# ----------------------------------------------------------------------------------------------
# the tables
# ----------------------------------------------------------------------------------------------
_FORWARD = ("q", "k", "v", "key_bias", "scale", "causal", "want_cls")
_BACKWARD = ("dout", "dcls", "dlse", "q", "k", "v", "key_bias", "key_bias_grad", "out", "lse",
             "scale", "causal", "dq", "dk", "dv")
_CPU = "xray_ops.cpu.attention"

# Triton first: the primary path (forward and backward); the CUDA forward joins "auto" after it
# until measurements on the GPU say otherwise. On CPU tensors: the cpu backend (PyTorch's
# flash kernel); the torch reference builds the (Nq, Nk) matrix.
declare(OP, forward=_FORWARD, backward=_BACKWARD, key="q",
        priority=("triton", "cuda", "cpu", "torch"))
register(OP, "torch", forward=_torch_forward, backward=_torch_backward, dtypes=FLOATS)
register(OP, "triton", forward=_triton_forward, backward=_triton_backward, dtypes=GPU_FLOATS,
         forward_check=triton_forward_check, backward_check=triton_backward_check)
# The CUDA forward computes out and lse; its CLS row and the whole backward are the Triton
# kernels, so it needs both runtimes, and last_backend says what ran.
register(OP, "cuda", forward=_cuda_forward, backward=_triton_backward, dtypes=HALF_FLOATS,
         min_compute_capability=(8, 0),
         runtime=requires(cuda_extension("flash_attention_forward"), TRITON),
         forward_check=cuda_forward_check, backward_check=triton_backward_check,
         forward_reports=lambda i: "cuda+triton" if i.want_cls else "cuda",
         backward_reports="triton")
# float64 stays with the reference: lse is float32 by contract, too coarse for its backward
register(OP, "cpu", forward=lazy(_CPU, "flash_attention_forward"),
         backward=lazy(_CPU, "flash_attention_backward"), dtypes=GPU_FLOATS, runtime=TORCH)

_VARLEN_FORWARD = _FORWARD[:3] + _VARLEN_META + _FORWARD[3:]
_VARLEN_BACKWARD = _BACKWARD[:6] + _VARLEN_META + _BACKWARD[6:]
declare(OP_VARLEN, forward=_VARLEN_FORWARD, backward=_VARLEN_BACKWARD, key="q",
        priority=("triton", "cpu", "torch"))
register(OP_VARLEN, "torch", forward=_torch_forward_varlen, backward=_torch_backward_varlen,
         dtypes=FLOATS)
register(OP_VARLEN, "triton", forward=_triton_forward_varlen, backward=_triton_backward_varlen,
         dtypes=GPU_FLOATS, forward_check=triton_forward_check,
         backward_check=triton_backward_check)
register(OP_VARLEN, "cpu", forward=lazy(_CPU, "flash_attention_varlen_forward"),
         backward=lazy(_CPU, "flash_attention_varlen_backward"), dtypes=GPU_FLOATS,
         runtime=TORCH)
