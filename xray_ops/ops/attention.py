"""Flash attention with key_bias and the CLS row: validation, torch.library ops, autograd,
backends.

Public: :func:`flash_attention`, :func:`flash_attention_qkvpacked`,
:func:`flash_attention_varlen`. The definition lives in :mod:`xray_ops.reference.attention`;
the kernels in ``xray_ops.kernels.flash_attention`` / ``flash_attention_bwd`` (Triton) and
``csrc/flash_attn/`` (CUDA forward; its backward is the Triton one).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _dispatch, _validate
from .._dispatch import FLOATS, GPU_FLOATS, HALF_FLOATS, TRITON, cuda_extension, requires
from ..reference import attention as ref

OP = "flash_attention"
OP_VARLEN = "flash_attention_varlen"
# head dims the Triton kernels take: D as one or two power-of-two chunks of >= 16
TRITON_HEAD_DIMS = (16, 256)
# head dims of the CUDA forward (csrc/flash_attn)
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    s = _validate.number(scale, "scale")
    if not math.isfinite(s):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return s


def _check_flags(causal, return_cls_attn, return_lse) -> None:
    _validate.boolean(causal, "causal")
    _validate.boolean(return_cls_attn, "return_cls_attn")
    _validate.boolean(return_lse, "return_lse")


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(t, name, floating=True)
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, "
                             f"got shape {tuple(t.shape)}")
    _validate.same_device("q", q, k=k, v=v)
    _validate.same_dtype("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (like q) in the last dim, "
                         f"got shape {tuple(k.shape)} for q of shape {tuple(q.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"q: expected a head dim >= 1, got shape {tuple(q.shape)}")


def _check_key_bias(key_bias, q, expected: tuple, what: str) -> None:
    if key_bias is None:
        return
    _validate.tensor(key_bias, "key_bias", floating=True)
    _validate.same_device("q", q, key_bias=key_bias)
    _validate.shape(key_bias, "key_bias", expected, what)


def _pack(out, cls, lse, return_cls_attn: bool, return_lse: bool):
    if not (return_cls_attn or return_lse):
        return out
    res = (out,)
    if return_cls_attn:
        res += (cls,)
    if return_lse:
        res += (lse,)
    return res


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, key_bias: torch.Tensor | None = None,
                    return_cls_attn: bool = False, return_lse: bool = False):
    """Softmax attention without the (Nq, Nk) matrix, with a per-key bias and the CLS row.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D) (torch SDPA's layout), fp16 / bf16 / fp32
            (fp64: torch backend only), any strides. Nq, Nk >= 1 and may differ.
        causal: mask keys j > i for query i (top-left aligned, as SDPA's ``is_causal``).
        scale: softmax scale, default D ** -0.5.
        key_bias: (B, Nk) float, added to every logit of key j (all heads and queries);
            differentiable. ToMe's proportional attention is ``key_bias = size.log()``.
        return_cls_attn: also return cls_attn (B, Nk), q's dtype: the mean over heads of query
            0's softmax row (key_bias included) — what EViT ranks tokens by.
        return_lse: also return lse (B, H, Nq) float32, each row's log-sum-exp.

    Returns:
        out (B, H, Nq, D) in q's dtype — stored as (B, Nq, H, D) (a transposed view, like
        SDPA's flash backend), so ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free — or
        the tuple (out, cls_attn, lse) holding only the extras asked for, in that order.

    Differentiable in q, k, v, key_bias (cls_attn in q, k, key_bias; lse too). fp16/bf16
    compute with fp32 accumulation and an fp32 softmax; fp32 inputs use IEEE fp32 dot products
    on the GPU (no TF32), so fp32 results keep fp32 accuracy. Rows whose keys are all masked
    (key_bias -inf) give out 0 and lse -inf. Equivalent PyTorch::

        S = scale * q @ k.transpose(-1, -2) + key_bias[:, None, None, :]
        if causal:
            S = S.masked_fill(~torch.ones(Nq, Nk, dtype=torch.bool).tril(), float("-inf"))
        P = S.softmax(-1)
        out, cls_attn, lse = P @ v, P[:, :, 0].mean(1), S.logsumexp(-1).float()
    """
    _check_qkv(q, k, v, 4, "(B, H, N, D)")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H):
        raise ValueError(f"k: expected batch and heads {(B, H)} (like q) in dims 0 and 1, "
                         f"got shape {tuple(k.shape)} for q of shape {tuple(q.shape)}")
    Nk = k.shape[2]
    if H < 1 or Nq < 1 or Nk < 1:
        raise ValueError(f"q, k: expected at least 1 head, 1 query and 1 key, got q of shape "
                         f"{tuple(q.shape)} and k of shape {tuple(k.shape)}")
    _check_key_bias(key_bias, q, (B, Nk), "(B, Nk)")
    _check_flags(causal, return_cls_attn, return_lse)
    scale = _check_scale(scale, D)
    out, cls, lse = torch.ops.xray_ops.flash_attention(
        q, k, v, key_bias, scale, causal, return_cls_attn, return_lse,
        _dispatch.requested_backend())
    return _pack(out, cls, lse, return_cls_attn, return_lse)


def flash_attention_qkvpacked(qkv: torch.Tensor, *, causal: bool = False,
                              scale: float | None = None, key_bias: torch.Tensor | None = None,
                              return_cls_attn: bool = False, return_lse: bool = False):
    """:func:`flash_attention` on timm's packed projection, without the permute copy.

    qkv: (B, N, 3, H, D) as ``self.qkv(x).reshape(B, N, 3, H, D)`` gives it (any strides).
    The kernels read q, k, v through strides; the backward writes one (B, N, 3, H, D)
    gradient. Returns out (B, H, N, D) (stored as (B, N, H, D)) and the extras as
    :func:`flash_attention`. Equivalent PyTorch::

        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        flash_attention(q, k, v, causal=causal, scale=scale, key_bias=key_bias, ...)
    """
    _validate.tensor(qkv, "qkv", floating=True)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    B, N, _, H, D = qkv.shape
    if H < 1 or N < 1 or D < 1:
        raise ValueError(f"qkv: expected at least 1 token, 1 head and head dim >= 1, "
                         f"got shape {tuple(qkv.shape)}")
    _check_key_bias(key_bias, qkv, (B, N), "(B, N)")
    _check_flags(causal, return_cls_attn, return_lse)
    scale = _check_scale(scale, D)
    out, cls, lse = torch.ops.xray_ops.flash_attention_qkvpacked(
        qkv, key_bias, scale, causal, return_cls_attn, return_lse,
        _dispatch.requested_backend())
    return _pack(out, cls, lse, return_cls_attn, return_lse)


def _check_cu(cu, name: str, q) -> None:
    _validate.tensor(cu, name, ndim=1, dtypes=(torch.int32, torch.int64))
    _validate.same_device("q", q, **{name: cu})
    if cu.numel() < 2:
        raise ValueError(f"{name}: expected (batch + 1,) cumulative lengths with batch >= 1, "
                         f"got shape {tuple(cu.shape)}")


def _check_cu_values(cu, name: str, total: int, max_seqlen: int, max_name: str) -> None:
    """Value checks (one device sync); skipped while torch.compile traces."""
    vals = cu.tolist()
    lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if vals[0] != 0 or vals[-1] != total:
        raise ValueError(f"{name}: expected to start at 0 and end at the token count {total}, "
                         f"got {vals[0]} ... {vals[-1]}")
    if min(lengths) < 1:
        raise ValueError(f"{name}: expected every sequence length >= 1 (increasing values), "
                         f"got lengths {lengths}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}: expected >= the longest sequence {max(lengths)}, "
                         f"got {max_seqlen}")


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           scale: float | None = None, key_bias: torch.Tensor | None = None,
                           return_cls_attn: bool = False, return_lse: bool = False):
    """:func:`flash_attention` on a batch of different lengths (a token budget per sample).

    Args:
        q: (Tq, H, D); k, v: (Tk, H, D); sample b holds rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
            of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v (every length >= 1).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32/int64, starting at 0.
        max_seqlen_q, max_seqlen_k: the longest lengths (checked eagerly; one device sync).
        causal, scale: as :func:`flash_attention` (causal is top-left per sample).
        key_bias: (Tk,) float, added to every logit of its key.

    Returns:
        out (Tq, H, D), or the tuple (out, cls_attn (Tk,): each sample's CLS row (its first
        query) averaged over heads, lse (H, Tq) float32) holding only the extras asked for.

    Equivalent PyTorch: each sample through :func:`flash_attention` on its own
    (``xray_ops.reference.attention.attention_varlen``).
    """
    _check_qkv(q, k, v, 3, "(total_tokens, H, D)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k: expected {q.shape[1]} heads (like q) in dim 1, "
                         f"got shape {tuple(k.shape)}")
    if q.shape[1] < 1:
        raise ValueError(f"q: expected at least 1 head, got shape {tuple(q.shape)}")
    _check_cu(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_k: expected the shape of cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)} (one entry per sample + 1), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    _validate.integer(max_seqlen_q, "max_seqlen_q", lo=1)
    _validate.integer(max_seqlen_k, "max_seqlen_k", lo=1)
    _check_key_bias(key_bias, q, (k.shape[0],), "(Tk,): one value per key token")
    _check_flags(causal, return_cls_attn, return_lse)
    scale = _check_scale(scale, q.shape[-1])
    if not torch.compiler.is_compiling():
        _check_cu_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_cu_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    out, cls, lse = torch.ops.xray_ops.flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, scale,
        causal, return_cls_attn, return_lse, _dispatch.requested_backend())
    return _pack(out, cls, lse, return_cls_attn, return_lse)


# ----------------------------------------------------------------------------------------------
# torch.library registration: dense
# ----------------------------------------------------------------------------------------------
def _bnhd_empty(q: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n, D) in (B, n, H, D) storage: outputs and gradients of the dense op."""
    B, H, _, D = q.shape
    return q.new_empty(B, n, H, D).transpose(1, 2)


def _fill_missing_cls(cls, q, k):
    return cls if cls is not None else q.new_empty(q.shape[0], 0)


@torch.library.custom_op("xray_ops::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_bias: Optional[torch.Tensor], scale: float, causal: bool,
                        return_cls: bool, return_lse: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # return_lse only tells the backward whether lse's gradient is live
    out, cls, lse = _dispatch.run(OP, backend, q=q, k=k, v=v, key_bias=key_bias, scale=scale,
                                  causal=causal, want_cls=return_cls)
    return out, _fill_missing_cls(cls, q, k), lse


def _fake_dense(q, k, return_cls):
    B, H, Nq, _ = q.shape
    cls = q.new_empty(B, k.shape[2] if return_cls else 0)
    return _bnhd_empty(q, Nq), cls, q.new_empty(B, H, Nq, dtype=torch.float32)


@_flash_attention_op.register_fake
def _(q, k, v, key_bias, scale, causal, return_cls, return_lse, backend):
    return _fake_dense(q, k, return_cls)


def _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal,
                        dq, dk, dv):
    return _dispatch.run_backward(OP, backend, dout=dout, dcls=dcls, dlse=dlse, q=q, k=k, v=v,
                                  key_bias=key_bias, out=out, lse=lse, scale=scale,
                                  causal=causal, dq=dq, dk=dk, dv=dv)


@torch.library.custom_op("xray_ops::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
        out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _bnhd_empty(q, q.shape[2]), _bnhd_empty(k, k.shape[2]), _bnhd_empty(v, v.shape[2])
    db = _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal,
                             dq, dk, dv)
    return dq, dk, dv, (db if db is not None else q.new_empty(0))


@_flash_attention_backward_op.register_fake
def _(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, backend):
    db = torch.empty_like(key_bias, memory_format=torch.contiguous_format) \
        if key_bias is not None else q.new_empty(0)
    return _bnhd_empty(q, q.shape[2]), _bnhd_empty(k, k.shape[2]), _bnhd_empty(v, v.shape[2]), db


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, scale, causal, return_cls, return_lse, backend = inputs
    out, _, lse = output
    ctx.save_for_backward(q, k, v, key_bias, out, lse)
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
    ctx.return_cls, ctx.return_lse = return_cls, return_lse


def _live_grads(ctx, dout, dcls, dlse, out):
    # gradients of outputs the caller did not ask for are zeros (or None): drop them
    if dout is None:
        dout = torch.zeros_like(out)
    return dout, (dcls if ctx.return_cls else None), (dlse if ctx.return_lse else None)


def _backward(ctx, dout, dcls, dlse):
    q, k, v, key_bias, out, lse = ctx.saved_tensors
    dout, dcls, dlse = _live_grads(ctx, dout, dcls, dlse, out)
    dq, dk, dv, db = _flash_attention_backward_op(dout, dcls, dlse, q, k, v, key_bias, out, lse,
                                                  ctx.scale, ctx.causal, ctx.backend)
    return dq, dk, dv, (db if key_bias is not None else None), None, None, None, None, None


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# torch.library registration: packed qkv (the same backends, through strided views)
# ----------------------------------------------------------------------------------------------
def _unpack(qkv: torch.Tensor):
    """(B, N, 3, H, D) -> q, k, v views (B, H, N, D): no copy."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("xray_ops::flash_attention_qkvpacked", mutates_args=())
def _flash_attention_qkvpacked_op(qkv: torch.Tensor, key_bias: Optional[torch.Tensor],
                                  scale: float, causal: bool, return_cls: bool, return_lse: bool,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _unpack(qkv)
    out, cls, lse = _dispatch.run(OP, backend, q=q, k=k, v=v, key_bias=key_bias, scale=scale,
                                  causal=causal, want_cls=return_cls)
    return out, _fill_missing_cls(cls, q, k), lse


@_flash_attention_qkvpacked_op.register_fake
def _(qkv, key_bias, scale, causal, return_cls, return_lse, backend):
    q, k, _ = _unpack(qkv)
    return _fake_dense(q, k, return_cls)


@torch.library.custom_op("xray_ops::flash_attention_qkvpacked_backward", mutates_args=())
def _flash_attention_qkvpacked_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        qkv: torch.Tensor, key_bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
        scale: float, causal: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unpack(qkv)
    # one (B, N, 3, H, D) gradient: the kernels write dq, dk, dv into its strided views
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    dq, dk, dv = _unpack(dqkv)
    db = _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal,
                             dq, dk, dv)
    return dqkv, (db if db is not None else qkv.new_empty(0))


@_flash_attention_qkvpacked_backward_op.register_fake
def _(dout, dcls, dlse, qkv, key_bias, out, lse, scale, causal, backend):
    db = torch.empty_like(key_bias, memory_format=torch.contiguous_format) \
        if key_bias is not None else qkv.new_empty(0)
    return torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype), db


def _setup_context_packed(ctx, inputs, output):
    qkv, key_bias, scale, causal, return_cls, return_lse, backend = inputs
    out, _, lse = output
    ctx.save_for_backward(qkv, key_bias, out, lse)
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
    ctx.return_cls, ctx.return_lse = return_cls, return_lse


def _backward_packed(ctx, dout, dcls, dlse):
    qkv, key_bias, out, lse = ctx.saved_tensors
    dout, dcls, dlse = _live_grads(ctx, dout, dcls, dlse, out)
    dqkv, db = _flash_attention_qkvpacked_backward_op(dout, dcls, dlse, qkv, key_bias, out, lse,
                                                      ctx.scale, ctx.causal, ctx.backend)
    return dqkv, (db if key_bias is not None else None), None, None, None, None, None


_flash_attention_qkvpacked_op.register_autograd(_backward_packed,
                                                setup_context=_setup_context_packed)


# ----------------------------------------------------------------------------------------------
# torch.library registration: varlen
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::flash_attention_varlen", mutates_args=())
def _flash_attention_varlen_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        key_bias: Optional[torch.Tensor], scale: float, causal: bool, return_cls: bool,
        return_lse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, cls, lse = _dispatch.run(
        OP_VARLEN, backend, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, key_bias=key_bias, scale=scale,
        causal=causal, want_cls=return_cls)
    return out, (cls if cls is not None else q.new_empty(0)), lse


@_flash_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, scale, causal,
      return_cls, return_lse, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(k.shape[0] if return_cls else 0),
            q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32))


@torch.library.custom_op("xray_ops::flash_attention_varlen_backward", mutates_args=())
def _flash_attention_varlen_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        key_bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
        causal: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    db = _dispatch.run_backward(
        OP_VARLEN, backend, dout=dout, dcls=dcls, dlse=dlse, q=q, k=k, v=v,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, key_bias=key_bias, out=out, lse=lse, scale=scale,
        causal=causal, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv, (db if db is not None else q.new_empty(0))


@_flash_attention_varlen_backward_op.register_fake
def _(dout, dcls, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      key_bias, out, lse, scale, causal, backend):
    db = torch.empty_like(key_bias, memory_format=torch.contiguous_format) \
        if key_bias is not None else q.new_empty(0)
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), db)


def _setup_context_varlen(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, key_bias, scale, causal, return_cls, return_lse,
     backend) = inputs
    out, _, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, key_bias, out, lse)
    ctx.max_q, ctx.max_k = max_q, max_k
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
    ctx.return_cls, ctx.return_lse = return_cls, return_lse


def _backward_varlen(ctx, dout, dcls, dlse):
    q, k, v, cu_q, cu_k, key_bias, out, lse = ctx.saved_tensors
    dout, dcls, dlse = _live_grads(ctx, dout, dcls, dlse, out)
    dq, dk, dv, db = _flash_attention_varlen_backward_op(
        dout, dcls, dlse, q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k, key_bias, out, lse,
        ctx.scale, ctx.causal, ctx.backend)
    return (dq, dk, dv, None, None, None, None, (db if key_bias is not None else None),
            None, None, None, None, None)


_flash_attention_varlen_op.register_autograd(_backward_varlen,
                                             setup_context=_setup_context_varlen)


# ----------------------------------------------------------------------------------------------
# backends. Canonical arguments —
#   forward:  (q, k, v, key_bias, scale, causal, want_cls) -> (out, cls or None, lse)
#   backward: (dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, dq, dk, dv)
#             -> dkey_bias or None; writes dq, dk, dv (any strides)
#   varlen adds (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) after v (after the
#   forward's v, the backward's v).
# ----------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # the torch backend computes fp16/bf16 in float32 (as the kernels accumulate)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(t, dtype):
    return t.to(dtype) if t is not None else None


def _torch_forward(q, k, v, key_bias, scale, causal, want_cls):
    acc = _acc_dtype(q.dtype)
    o, cls, lse = ref.attention(q.to(acc), k.to(acc), v.to(acc), scale, _up(key_bias, acc),
                                causal)
    out = _bnhd_empty(q, q.shape[2])
    out.copy_(o)
    return out, (cls.to(q.dtype) if want_cls else None), lse.float()


def _torch_backward(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, dq, dk, dv):
    acc = _acc_dtype(q.dtype)
    gq, gk, gv, gb = ref.attention_backward(
        _up(dout, acc), _up(dcls, acc), _up(dlse, acc), q.to(acc), k.to(acc), v.to(acc), scale,
        _up(key_bias, acc), causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)
    return gb.to(key_bias.dtype) if key_bias is not None else None


def _triton_forward(q, k, v, key_bias, scale, causal, want_cls):
    from ..kernels import flash_attention as kf

    return kf.flash_attention_forward(q, k, v, key_bias, scale, causal, want_cls)


def _triton_backward(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale, causal, dq, dk, dv):
    from ..kernels import flash_attention_bwd as kb

    return kb.flash_attention_backward(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale,
                                       causal, dq, dk, dv)


def _cuda_forward(q, k, v, key_bias, scale, causal, want_cls):
    from .. import _ext
    from ..kernels import flash_attention as kf

    bias32 = key_bias.float() if key_bias is not None else None  # the extension reads fp32
    # the extension writes (B, Nq, H, D) storage seen as (B, H, Nq, D), like the Triton path
    out, lse = _ext.get().flash_attention_forward(q, k, v, bias32, scale, causal)
    cls = kf.cls_attn_forward(q, k, key_bias, lse, scale, causal) if want_cls else None
    return out, cls, lse


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
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        reasons.append("bfloat16 under the Triton interpreter: its tl.dot on bfloat16 is wrong "
                       "(triton-lang/triton#11584); use float16/float32 on the CPU")
    return reasons + _int32_offsets_reasons(q, k, v, *out_grads)


def _triton_forward_check(i) -> list[str]:
    return _triton_reasons(i.q, i.k, i.v)


def _triton_backward_check(i) -> list[str]:
    return _triton_reasons(i.q, i.k, i.v, out_grads=(i.dout, i.dq, i.dk, i.dv))


def _cuda_forward_check(i) -> list[str]:
    reasons = []
    D = i.q.shape[-1]
    if D not in CUDA_HEAD_DIMS:
        reasons.append(f"head dim {D} not supported (supports {list(CUDA_HEAD_DIMS)})")
    for name in ("q", "k", "v"):
        t = getattr(i, name)
        if t.stride(-1) != 1:
            reasons.append(f"{name} needs stride(-1) == 1, got strides {tuple(t.stride())}")
    return reasons


_DENSE_FORWARD = ("q", "k", "v", "key_bias", "scale", "causal", "want_cls")
_DENSE_BACKWARD = ("dout", "dcls", "dlse", "q", "k", "v", "key_bias", "out", "lse", "scale",
                   "causal", "dq", "dk", "dv")
# Triton first: the primary path (forward and backward); the CUDA forward joins "auto" after it
# until measurements on the GPU say otherwise.
_dispatch.declare(OP, forward=_DENSE_FORWARD, backward=_DENSE_BACKWARD, key="q",
                  priority=("triton", "cuda", "torch"))
_dispatch.register(OP, "torch", forward=_torch_forward, backward=_torch_backward, dtypes=FLOATS)
_dispatch.register(OP, "triton", forward=_triton_forward, backward=_triton_backward,
                   dtypes=GPU_FLOATS, forward_check=_triton_forward_check,
                   backward_check=_triton_backward_check)
# The CUDA forward computes out and lse; its CLS row and the whole backward are the Triton
# kernels, so it needs both runtimes, and last_backend says what ran.
_dispatch.register(OP, "cuda", forward=_cuda_forward, backward=_triton_backward,
                   dtypes=HALF_FLOATS, min_compute_capability=(8, 0),
                   runtime=requires(cuda_extension("flash_attention_forward"), TRITON),
                   forward_check=_cuda_forward_check, backward_check=_triton_backward_check,
                   forward_reports=lambda i: "cuda+triton" if i.want_cls else "cuda",
                   backward_reports="triton")


# varlen backends ------------------------------------------------------------------------------
def _torch_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, key_bias, scale, causal,
                          want_cls):
    acc = _acc_dtype(q.dtype)
    o, cls, lse = ref.attention_varlen(q.to(acc), k.to(acc), v.to(acc), cu_q, cu_k, scale,
                                       _up(key_bias, acc), causal)
    return o.to(q.dtype), (cls.to(q.dtype) if want_cls else None), lse.float()


def _torch_backward_varlen(dout, dcls, dlse, q, k, v, cu_q, cu_k, max_q, max_k, key_bias, out,
                           lse, scale, causal, dq, dk, dv):
    acc = _acc_dtype(q.dtype)
    gq, gk, gv, gb = ref.attention_varlen_backward(
        _up(dout, acc), _up(dcls, acc), _up(dlse, acc), q.to(acc), k.to(acc), v.to(acc), cu_q,
        cu_k, scale, _up(key_bias, acc), causal)
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)
    return gb.to(key_bias.dtype) if key_bias is not None else None


def _triton_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, key_bias, scale, causal,
                           want_cls):
    from ..kernels import flash_attention as kf

    return kf.flash_attention_forward(q, k, v, key_bias, scale, causal, want_cls,
                                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                      max_seqlen_k=max_k)


def _triton_backward_varlen(dout, dcls, dlse, q, k, v, cu_q, cu_k, max_q, max_k, key_bias, out,
                            lse, scale, causal, dq, dk, dv):
    from ..kernels import flash_attention_bwd as kb

    return kb.flash_attention_backward(dout, dcls, dlse, q, k, v, key_bias, out, lse, scale,
                                       causal, dq, dk, dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       max_seqlen_q=max_q, max_seqlen_k=max_k)


_dispatch.declare(OP_VARLEN, key="q", priority=("triton", "torch"),
                  forward=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                           "max_seqlen_k", "key_bias", "scale", "causal", "want_cls"),
                  backward=("dout", "dcls", "dlse", "q", "k", "v", "cu_seqlens_q",
                            "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "key_bias", "out",
                            "lse", "scale", "causal", "dq", "dk", "dv"))
_dispatch.register(OP_VARLEN, "torch", forward=_torch_forward_varlen,
                   backward=_torch_backward_varlen, dtypes=FLOATS)
_dispatch.register(OP_VARLEN, "triton", forward=_triton_forward_varlen,
                   backward=_triton_backward_varlen, dtypes=GPU_FLOATS,
                   forward_check=_triton_forward_check, backward_check=_triton_backward_check)
