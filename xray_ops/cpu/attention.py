"""Flash attention on the CPU, on PyTorch's own CPU flash kernel.

``aten._scaled_dot_product_flash_attention_for_cpu`` (what SDPA runs on the CPU) computes
softmax attention blockwise — the (Nq, Nk) matrix never exists — takes a float ``attn_mask``
and returns the row log-sum-exp beside the output; its ``_backward`` gives dq, dk and dv. What
it does not give is built around it without an (Nq, Nk) matrix either:

- key_bias is the mask, as a broadcast (B, 1, 1, Nk) view (never materialised); the kernel
  wants it in q's dtype. Without key_bias a zero mask: the kernel's unmasked path returns 0
  for a query row holding NaN, its masked path NaN, as the definition does.
- cls_attn is one extra row per head: exp(scale · q₀ · kᵀ + bias − lse₀), averaged over heads.
- Rows whose keys are all masked (key_bias -inf): the kernel gives out 0 and lse 0; the
  contract says lse -inf, so those rows are found from key_bias and set.
- Backward: the gradients are linear in what arrives at the three outputs, so each part is
  added on its own.
  * dout: the kernel's backward as is.
  * dcls (the CLS row, row 0 of every head, takes dcls / H): a rank-one correction,
    dS₀ = P₀ ⊙ (g − ⟨P₀, g⟩) with g = dcls / H, added to dq₀, dk and dkey_bias —
    O(B·H·Nk·D), never the matrix.
  * dlse and dkey_bias: one extra head-dim column e. q, k, v, out and dout are copied into
    (D + 1)-wide float32 buffers (so 16-bit inputs get a float32 backward here).
    q'ₑ = 1 / scale and k'ₑ = 0 leave every logit as is, and the kernel's
    dk'ₑ = scale · Σᵢ dSᵢⱼ q'ₑ = Σᵢ dSᵢⱼ is dkey_bias for that head: the sums of dS over the
    queries, accumulated blockwise inside the kernel. v'ₑ = 0, dout'ₑ = 1 and out'ₑ = −dlse
    turn the kernel's δᵢ = Σ dout'ᵢ · out'ᵢ into δᵢ − dlseᵢ, which is exactly the dlse term
    dSᵢⱼ += Pᵢⱼ dlseᵢ. The copies cost O(B·H·N·D); without a key_bias gradient or an lse
    gradient the kernel runs on the inputs directly.

The kernel's backward computes δ from dout and out (FlashAttention-2); the tests against the
float64 reference hold every gradient to it. fp16 / bf16 / fp32 (float64 is the reference's:
lse is float32 by contract, too coarse for a float64 backward). Layouts: dense q (B, H, Nq, D),
k / v (B, H, Nk, D), any strides, out in (B, Nq, H, D) storage; varlen runs each sample as a
dense batch of one.
"""

from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_NEG_INF = float("-inf")


def _mask(key_bias: torch.Tensor | None, dtype: torch.dtype, n_k: int) -> torch.Tensor:
    """key_bias (B, Nk) as the kernel's float mask: a (B, 1, 1, Nk) view in the dtype of q
    (the kernel requires it). Without key_bias a zero mask (one element, broadcast): without
    any mask the kernel returns 0 for a query row holding NaN or Inf, with one it gives NaN,
    as the definition does."""
    if key_bias is None:
        return torch.zeros((), dtype=dtype).expand(1, 1, 1, n_k)
    return key_bias.to(dtype)[:, None, None, :]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dead_rows(key_bias: torch.Tensor | None, n_q: int, causal: bool) -> torch.Tensor | None:
    """(B, Nq) bool: rows whose every visible key has bias -inf; None when there are none."""
    if key_bias is None:
        return None
    neg = torch.isneginf(key_bias)
    if not bool(neg.any()):
        return None
    if not causal:
        return neg.all(-1, keepdim=True).expand(-1, n_q)
    # query i sees keys 0..i: dead iff the prefix 0..min(i, Nk-1) is all -inf
    prefix = torch.cummin(neg.to(torch.int8), -1).values.bool()  # (B, Nk)
    rows = torch.arange(n_q, device=key_bias.device).clamp_(max=key_bias.shape[1] - 1)
    return prefix[:, rows]


def _row0_probs(q, k, key_bias, lse, scale: float, causal: bool) -> torch.Tensor:
    """P[:, h, 0, :] (B, H, Nk) in float32 (float64 for float64) from lse: one row per head."""
    acc = _acc(q.dtype)
    s = torch.matmul(q[:, :, :1].to(acc), k.to(acc).transpose(-1, -2))[:, :, 0] * scale
    if key_bias is not None:
        s = s + key_bias.to(acc)[:, None, :]
    lse0 = lse[:, :, :1].to(acc)
    # a fully masked row 0 (lse -inf) has P = 0: shift by +inf so exp gives 0, not NaN
    lse0 = lse0.masked_fill(lse0 == _NEG_INF, float("inf"))
    p0 = torch.exp(s - lse0)
    if causal:
        p0[:, :, 1:] = 0  # query 0 sees key 0 only
    return p0


def flash_attention_forward(q, k, v, key_bias, scale: float, causal: bool, want_cls: bool):
    """(out (B, H, Nq, D) in (B, Nq, H, D) storage, cls_attn (B, Nk) or None,
    lse (B, H, Nq) float32). Equivalent: ``xray_ops.reference.attention.attention``."""
    B, H, Nq, D = q.shape
    mask = _mask(key_bias, q.dtype, k.shape[2])
    o, lse = _FWD(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if o.transpose(1, 2).is_contiguous():  # (q in (B, N, H, D) storage, e.g. packed qkv)
        out = o
    else:
        out = q.new_empty(B, Nq, H, D).transpose(1, 2)
        out.copy_(o)
    lse = lse.float().contiguous()  # the contract: float32, (B, H, Nq) contiguous
    dead = _dead_rows(key_bias, Nq, causal)
    if dead is not None:
        lse.masked_fill_(dead[:, None, :], _NEG_INF)
    cls = None
    if want_cls:
        cls = _row0_probs(q, k, key_bias, lse, scale, causal).mean(1).to(q.dtype)
    return out, cls, lse


def _padded(t: torch.Tensor, fill: float | torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """t (B, H, N, D) copied (times ``factor``) into a float32 (float64 for float64)
    (B, H, N, D + 1) buffer whose extra column holds ``fill`` (a number or a (B, H, N)
    tensor)."""
    B, H, N, D = t.shape
    buf = t.new_empty(B, H, N, D + 1, dtype=_acc(t.dtype))
    if factor == 1.0:
        buf[..., :D].copy_(t)
    else:
        torch.mul(t, factor, out=buf[..., :D])
    buf[..., D] = fill
    return buf


def flash_attention_backward(dout, dcls, dlse, q, k, v, key_bias, key_bias_grad: bool, out, lse,
                             scale: float, causal: bool, dq, dk, dv):
    """Writes dq, dk, dv (any strides); returns dkey_bias (B, Nk) when key_bias_grad, else
    None. dcls (B, Nk) / dlse (B, H, Nq) may be None (no gradient arrives there)."""
    B, H, Nq, D = q.shape
    want_db = key_bias is not None and key_bias_grad
    # the kernel's own convention for fully masked rows (P = exp(-inf - 0) = 0)
    lse_k = lse.masked_fill(lse == _NEG_INF, 0.0)
    if dlse is None and not want_db:
        gq, gk, gv = _BWD(dout, q, k, v, out, lse_k, 0.0, causal,
                          attn_mask=_mask(key_bias, q.dtype, k.shape[2]), scale=scale)
        db_heads = None
    else:
        # the extra column: see the module docstring. The buffers are float32 (float64), so
        # for 16-bit inputs this backward computes in float32 and dkey_bias is summed over the
        # heads before any rounding. q'ₑ = 1 / scale: the kernel's dk'ₑ = scale · Σᵢ dSᵢⱼ · q'ₑ
        # is Σᵢ dSᵢⱼ, divided below by the q'ₑ actually stored (its rounding cancels). With
        # scale 0 q is pre-scaled instead and the kernel runs with scale 1.
        live = dlse is not None
        acc = _acc(q.dtype)
        c = torch.tensor(1.0 / scale if scale != 0 else float("inf"), dtype=acc)
        prescale = not bool(torch.isfinite(c))
        q_scale, k_scale, c = (scale, 1.0, 1.0) if prescale else (1.0, scale, float(c))
        gq, gk, gv = _BWD(_padded(dout, 1.0 if live else 0.0), _padded(q, c, q_scale),
                          _padded(k, 0.0), _padded(v, 0.0),
                          _padded(out, -dlse.to(acc) if live else 0.0), lse_k.to(acc), 0.0,
                          causal, attn_mask=_mask(key_bias, acc, k.shape[2]), scale=k_scale)
        db_heads = gk[..., D] / (k_scale * c) if want_db else None
        gq, gk, gv = gq[..., :D], gk[..., :D], gv[..., :D]
        if prescale:
            gq = gq.mul_(scale)
    if dcls is not None:
        # the CLS row: every head's row 0 receives dcls / H (rank one, row 0 only)
        acc = _acc(q.dtype)
        p0 = _row0_probs(q, k, key_bias, lse, scale, causal)  # (B, H, Nk)
        g = dcls.to(acc)[:, None, :] / H
        ds0 = p0 * (g - (p0 * g).sum(-1, keepdim=True))
        gq[:, :, 0] += (torch.matmul(ds0[:, :, None, :], k.to(acc))[:, :, 0] * scale).to(gq.dtype)
        gk += (ds0[..., None] * (q[:, :, :1].to(acc) * scale)).to(gk.dtype)
        if want_db:
            db_heads = db_heads + ds0
    dq.copy_(gq)
    dk.copy_(gk)
    dv.copy_(gv)
    return db_heads.sum(1).to(key_bias.dtype) if want_db else None


# ----------------------------------------------------------------------------------------------
# variable-length batches: each sample as a dense batch of one (views, no copies)
# ----------------------------------------------------------------------------------------------
def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _dense(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of a (T, H, D) tensor as a (1, H, b - a, D) view."""
    return t[a:b].transpose(0, 1)[None]


def flash_attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, key_bias, scale: float, causal: bool,
                                   want_cls: bool):
    """q (Tq, H, D), k / v (Tk, H, D), key_bias (Tk,) -> out (Tq, H, D), cls_attn (Tk,) or
    None, lse (H, Tq) float32. Equivalent: ``xray_ops.reference.attention.attention_varlen``."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    cls = q.new_empty(k.shape[0]) if want_cls else None
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k)):
        bias = key_bias[k0:k1][None] if key_bias is not None else None
        o, c, l = flash_attention_forward(_dense(q, q0, q1), _dense(k, k0, k1),
                                          _dense(v, k0, k1), bias, scale, causal, want_cls)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
        if want_cls:
            cls[k0:k1] = c[0]
    return out, cls, lse


def flash_attention_varlen_backward(dout, dcls, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, key_bias, key_bias_grad: bool,
                                    out, lse, scale: float, causal: bool, dq, dk, dv):
    """Writes dq, dk, dv ((T, H, D), any strides); returns dkey_bias (Tk,) or None."""
    want_db = key_bias is not None and key_bias_grad
    db = torch.zeros_like(key_bias, memory_format=torch.contiguous_format) if want_db else None
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k)):
        bias = key_bias[k0:k1][None] if key_bias is not None else None
        g = flash_attention_backward(
            _dense(dout, q0, q1), dcls[k0:k1][None] if dcls is not None else None,
            dlse[:, q0:q1][None] if dlse is not None else None, _dense(q, q0, q1),
            _dense(k, k0, k1), _dense(v, k0, k1), bias, key_bias_grad, _dense(out, q0, q1),
            lse[:, q0:q1][None], scale, causal, _dense(dq, q0, q1), _dense(dk, k0, k1),
            _dense(dv, k0, k1))
        if want_db:
            db[k0:k1] = g[0]
    return db
