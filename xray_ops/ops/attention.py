"""Flash attention with key_bias and the CLS row: the public functions and their validation.

Public: :func:`flash_attention`, :func:`flash_attention_qkvpacked`,
:func:`flash_attention_varlen`. The definition lives in :mod:`xray_ops.reference.attention`;
the torch.library ops and their autograd in :mod:`xray_ops.ops.attention_library`; the backend
tables in :mod:`xray_ops.ops.attention_backends`; the kernels in
``xray_ops.kernels.flash_attention`` / ``flash_attention_bwd`` (Triton), ``csrc/flash_attn/``
(CUDA forward; its CLS row and backward are the Triton ones) and :mod:`xray_ops.cpu.attention`
(PyTorch's CPU flash kernel).
"""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _validate
from . import attention_library  # noqa: F401  (registers the torch.library ops)


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
