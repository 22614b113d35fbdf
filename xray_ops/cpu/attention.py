"""Flash attention on the CPU, on PyTorch's own CPU flash kernel.

``aten._scaled_dot_product_flash_attention_for_cpu`` (what SDPA runs on the CPU) computes
softmax attention blockwise — the (Nq, Nk) matrix never exists — takes a float ``attn_mask``
and returns the row log-sum-exp beside the output; its ``_backward`` gives dq, dk and dv. What
it does not give is built around it without an (Nq, Nk) matrix either:

- key_bias is the mask, as a broadcast (B, 1, 1, Nk) view (never materialised); the kernel
  wants it in q's dtype. Without key_bias a zero mask: the kernel's unmasked path returns 0
  for a query row holding NaN, its masked path NaN, as the definition does.
- cls_attn is one extra softmax row per head (query 0's logits scale · q₀ · kᵀ + bias),
  averaged over heads: what exp(logits − lse₀) gives, normalised by the row's own sum instead
  (one row: cheap, and exact where the kernel's float32 lse is not).
- Rows whose keys are all masked (key_bias -inf): the kernel gives out 0 and lse 0; the
  contract says lse -inf, so those rows are found from key_bias and set.
- Backward: the gradients are linear in what arrives at the three outputs, so each part is
  added on its own.
  * dout alone: the kernel's backward as is (dq, dk, dv).
  * dcls (the CLS row, row 0 of every head, takes dcls / H): a rank-one correction,
    dS₀ = P₀ ⊙ (g − ⟨P₀, g⟩) with g = dcls / H, added to dq₀, dk and dkey_bias —
    O(B·H·Nk·D), never the matrix.
  * dkey_bias (the sums of dS over the heads and queries) or dlse (dS += P ⊙ dlse, only
    with a gradient through lse): the whole backward in one pass over P, a slab of queries at
    a time (:func:`_slab_backward`), instead of the kernel's backward (beside it, a second
    pass that recomputed P for dkey_bias made the backward 2× eager's).

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
# queries per slab of P in the backward's own pass: (B, H, _BLOCK, Nk) at a time (128: the
# batched matmuls of smaller slabs ran ~20 % slower at ViT lengths)
_BLOCK = 128


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


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, in place; a row of -inf gives 0 (not NaN), as the kernel
    and the definition do. Normalised by the row's own sum rather than through the kernel's
    float32 lse, whose rounding (~1e-7 · |lse|) grows with the logits."""
    m = s.amax(-1, keepdim=True)
    s.sub_(m.masked_fill_(m == _NEG_INF, 0.0)).exp_()
    total = s.sum(-1, keepdim=True)
    return s.div_(total.masked_fill_(total == 0, 1.0))


def _row0_probs(q, k, key_bias, scale: float, causal: bool) -> torch.Tensor:
    """P[:, h, 0, :] (B, H, Nk) in float32 (float64 for float64): one softmax row per head."""
    acc = _acc(q.dtype)
    # a product and a sum rather than a batched matmul, which would first copy a k that is a
    # view of timm's packed qkv (its (B, H) dims do not merge)
    s = (k.to(acc) * (q[:, :, 0].to(acc) * scale)[:, :, None, :]).sum(-1)
    if key_bias is not None:
        s = s + key_bias.to(acc)[:, None, :]
    if causal:
        s[:, :, 1:] = _NEG_INF  # query 0 sees key 0 only
    # torch.softmax gives NaN on a row of -inf: the safe one where key_bias masks a whole row
    if key_bias is not None and bool(torch.isneginf(key_bias).any()):
        return _softmax_(s)
    return torch.softmax(s, -1)


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
        cls = _row0_probs(q, k, key_bias, scale, causal).mean(1).to(q.dtype)
    return out, cls, lse


def _bh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, X) -> (B·H, N, X) in ``dtype``: a view when the layout allows, else one copy."""
    B, H, N, X = t.shape
    return t.to(dtype).reshape(B * H, N, X)


def _slab_backward(q, k, v, key_bias, dout, dlse, scale: float, causal: bool,
                   block: int = _BLOCK):
    """The whole backward in one pass over P, a slab of ``block`` queries per head at a time
    (never the (Nq, Nk) matrix), for when the kernel's backward is not enough: key_bias wants
    its gradient, or lse carries one. Per slab (it holds whole rows):

        P = softmax(scale · q kᵀ + bias),  dP = dout vᵀ,  δᵢ = Σⱼ Pᵢⱼ dPᵢⱼ
        dS = P ⊙ (dP − δ + dlse)            (dlse: lse's gradient, 0 without one)
        dq = scale · dS k,  dk += scale · dSᵀ q,  dv += Pᵀ dout,  dkey_bias += Σᵢ dS

    Five matmuls and one softmax per slab: what the kernel's backward does, once. (Beside the
    kernel's backward, a pass for dkey_bias alone recomputed P and dP a second time: the
    backward took 2× eager's.) δ comes from the slab's own P and dP, not dout · out: exact
    where the kernel's float32 lse is not. (The identity Σᵢ Pᵢⱼ dPᵢⱼ = vⱼ · dvⱼ would spare
    a matmul, but the difference of two large sums loses digits: beyond the error budget in
    float32.)

    Returns (dq, dk, dv, dkey_bias per head (B, H, Nk)) in float32 (float64 for float64).
    """
    acc = _acc(q.dtype)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    q3, k3, v3, dout3 = _bh(q, acc), _bh(k, acc), _bh(v, acc), _bh(dout, acc)
    k3t, v3t = k3.transpose(1, 2), v3.transpose(1, 2)  # bmm takes the transposed views as is
    bias3 = key_bias.to(acc)[:, None, None, :].expand(B, H, 1, Nk).reshape(B * H, 1, Nk) \
        if key_bias is not None else None
    # torch.softmax gives NaN on a row of -inf: the safe one where key_bias masks whole rows
    softmax = _softmax_ if _dead_rows(key_bias, Nq, causal) is not None \
        else (lambda t: torch.softmax(t, -1))
    dlse3 = dlse.to(acc).reshape(B * H, Nq, 1) if dlse is not None else None
    dq3 = q3.new_empty(B * H, Nq, D)
    dk3 = q3.new_zeros(B * H, Nk, D)
    dv3 = q3.new_zeros(B * H, Nk, v.shape[3])
    db3 = q3.new_zeros(B * H, Nk)
    keys = torch.arange(Nk, device=q.device)
    for i0 in range(0, Nq, block):
        i1 = min(Nq, i0 + block)
        n = min(Nk, i1) if causal else Nk  # with causal, keys past the slab's last query are out
        q_s = q3[:, i0:i1] * scale  # scale the slab's queries, not its (block, Nk) logits
        s = torch.bmm(q_s, k3t[..., :n])
        if bias3 is not None:
            s.add_(bias3[..., :n])
        if causal:
            s.masked_fill_(keys[None, :n] > torch.arange(i0, i1, device=q.device)[:, None],
                           _NEG_INF)
        p = softmax(s)  # Pᵢⱼ of the slab
        do_s = dout3[:, i0:i1]
        dv3[:, :n].baddbmm_(p.transpose(1, 2), do_s)
        dp = torch.bmm(do_s, v3t[..., :n])
        w = (p * dp).sum(-1, keepdim=True)  # δᵢ
        if dlse3 is not None:
            w -= dlse3[:, i0:i1]
        ds = dp.sub_(w).mul_(p)  # dSᵢⱼ, in dp's storage
        db3[:, :n] += ds.sum(1)
        torch.bmm(ds, k3[:, :n], out=dq3[:, i0:i1]).mul_(scale)
        dk3[:, :n].baddbmm_(ds.transpose(1, 2), q_s)
    as4 = lambda t: t.view(B, H, *t.shape[1:])  # noqa: E731
    return as4(dq3), as4(dk3), as4(dv3), as4(db3)


def flash_attention_backward(dout, dcls, dlse, q, k, v, key_bias, key_bias_grad: bool, out, lse,
                             scale: float, causal: bool, dq, dk, dv):
    """Writes dq, dk, dv (any strides); returns dkey_bias (B, Nk) when key_bias_grad, else
    None. dcls (B, Nk) / dlse (B, H, Nq) may be None (no gradient arrives there)."""
    H = q.shape[1]
    acc = _acc(q.dtype)
    want_db = key_bias is not None and key_bias_grad
    db_heads = None
    if want_db or dlse is not None:
        gq, gk, gv, db_heads = _slab_backward(q, k, v, key_bias, dout, dlse, scale, causal)
    else:
        # the kernel's own convention for fully masked rows (P = exp(-inf - 0) = 0)
        lse_k = lse.masked_fill(lse == _NEG_INF, 0.0)
        gq, gk, gv = _BWD(dout, q, k, v, out, lse_k, 0.0, causal,
                          attn_mask=_mask(key_bias, q.dtype, k.shape[2]), scale=scale)
    if dcls is not None:
        # the CLS row: every head's row 0 receives dcls / H (rank one, row 0 only)
        p0 = _row0_probs(q, k, key_bias, scale, causal)  # (B, H, Nk)
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
