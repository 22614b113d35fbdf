"""Softmax attention with a per-key bias and the CLS-attention row: the definition, in PyTorch.

This is the definition and test oracle of ``xray_ops.flash_attention`` (it runs in any float
dtype, float64 included) and the ``torch`` backend (which calls it in float32 for fp16/bf16
inputs, in the input dtype otherwise). For q (B, H, Nq, D), k and v (B, H, Nk, D):

    S   = scale · q kᵀ + key_bias[:, None, None, :]      (B, H, Nq, Nk); masked entries -inf
    P   = softmax(S, -1),  out = P v,  lse = logsumexp(S, -1)
    cls_attn = P[:, :, 0, :].mean(1)                        (B, Nk): the CLS row, head mean

Causal mask: top-left aligned, the convention of torch SDPA's ``is_causal``: query i sees
keys 0..i (``torch.ones(Nq, Nk).tril()``), whatever Nq and Nk are. Query 0 then sees only key
0, so with ``causal`` cls_attn is [1, 0, 0, ...].

Fully masked rows (every logit -inf, e.g. a key_bias of -inf on every key): out = 0,
P = 0 and lse = -inf, as torch SDPA gives; their gradients are 0. NaN inputs propagate.

The backward is given in closed form (:func:`attention_backward`), because the ``torch``
backend runs inside a ``torch.library.custom_op`` body, where autograd is off. With
dP = dout vᵀ (+ dcls/H on row 0 of every head) and the row sums
delta_i = Σ_j P_ij dP_ij:

    dS = P ⊙ (dP − delta) + dlse ⊙ P
    dq = scale · dS k,   dk = scale · dSᵀ q,   dv = Pᵀ dout,   dkey_bias = Σ_{h, i} dS
"""

from __future__ import annotations

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(Nq, Nk) bool, True where query i may see key j: j <= i (top-left aligned, as SDPA)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float,
                     key_bias: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """S = scale · q kᵀ (+ key_bias per key) with -inf where the causal mask hides a key.

    q (B, H, Nq, D), k (B, H, Nk, D), key_bias (B, Nk) -> (B, H, Nq, Nk) in q's dtype.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias.to(s.dtype)[:, None, None, :]
    if causal:
        keep = causal_mask(q.shape[-2], k.shape[-2], q.device)
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax and logsumexp over the last dim; a row of -inf gives P = 0 and lse = -inf."""
    m = s.amax(-1, keepdim=True)
    # a fully masked row has max -inf: shift by 0 instead, so exp gives 0 rather than NaN
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              key_bias: torch.Tensor | None = None, causal: bool = False):
    """The definition: (out (B, H, Nq, D), cls_attn (B, Nk), lse (B, H, Nq)), all in q's dtype.

    Explicit softmax attention in q's dtype (float64 gives the oracle). Differentiable through
    PyTorch autograd (outside custom ops). Equivalent PyTorch for rows that are not fully
    masked::

        S = scale * q @ k.transpose(-1, -2) + key_bias[:, None, None, :]
        S = S.masked_fill(~torch.ones(Nq, Nk, dtype=torch.bool).tril(), -inf)  # if causal
        P = S.softmax(-1); out = P @ v; cls_attn = P[:, :, 0].mean(1); lse = S.logsumexp(-1)
    """
    s = attention_logits(q, k, scale, key_bias, causal)
    p, lse = _softmax_lse(s)
    out = torch.matmul(p, v)
    cls_attn = p[:, :, 0, :].mean(1)
    return out, cls_attn, lse


def cls_attn_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                      key_bias: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """The CLS row from the forward's log-sum-exp: one extra row, not a second attention.

    P[:, h, 0, j] = exp(scale · q[:, h, 0] · k[:, h, j] + key_bias[:, j] − lse[:, h, 0]);
    returns its mean over heads (B, Nk) in q's dtype (computed in lse's dtype or wider).
    """
    acc = torch.promote_types(q.dtype, lse.dtype)
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(acc), k.to(acc)) * scale
    if key_bias is not None:
        s = s + key_bias.to(acc)[:, None, :]
    lse0 = lse[:, :, :1].to(acc)
    # a fully masked row 0 (lse -inf) has P = 0: shift by +inf so exp gives 0 rather than NaN
    lse0 = torch.where(lse0 == float("-inf"), torch.full_like(lse0, float("inf")), lse0)
    p0 = torch.exp(s - lse0)
    if causal:
        p0[:, :, 1:] = 0  # query 0 sees key 0 only
    return p0.mean(1).to(q.dtype)


def attention_backward(dout: torch.Tensor | None, dcls: torch.Tensor | None,
                       dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, scale: float, key_bias: torch.Tensor | None = None,
                       causal: bool = False):
    """Closed-form gradients of :func:`attention` (no autograd), in q's dtype.

    dout (B, H, Nq, D), dcls (B, Nk), dlse (B, H, Nq): the gradients arriving at the three
    outputs (None = zero). Returns (dq, dk, dv, dkey_bias) with dkey_bias None when key_bias
    is None.
    """
    B, H, Nq, D = q.shape
    s = attention_logits(q, k, scale, key_bias, causal)
    p, _ = _softmax_lse(s)
    if dout is not None:
        dout = dout.to(q.dtype)
        dv = torch.matmul(p.transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2))
    else:
        dv = torch.zeros_like(v)
        dp = torch.zeros_like(p)
    if dcls is not None:
        # cls_attn = mean_h P[:, h, 0, :]: every head's row 0 receives dcls / H
        dp[:, :, 0, :] += dcls.to(q.dtype)[:, None, :] / H
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if dlse is not None:
        # d lse_i / d S_ij = P_ij
        ds = ds + p * dlse.to(q.dtype)[..., None]
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    dbias = ds.sum((1, 2)).to(key_bias.dtype) if key_bias is not None else None
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------------------------
# variable-length batches: (total, H, D) with cumulative sequence lengths
# ----------------------------------------------------------------------------------------------
def _segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, key_bias=None, causal=False):
    """Varlen definition: q (Tq, H, D), k/v (Tk, H, D), key_bias (Tk,) ->
    out (Tq, H, D), cls_attn (Tk,), lse (H, Tq). Sample b is rows cu[b]:cu[b+1]; each sample
    is :func:`attention` on its own (cls_attn: the row of its first query)."""
    outs, clss, lses = [], [], []
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k)):
        qb = q[q0:q1].transpose(0, 1)[None]
        kb = k[k0:k1].transpose(0, 1)[None]
        vb = v[k0:k1].transpose(0, 1)[None]
        bb = key_bias[k0:k1][None] if key_bias is not None else None
        o, c, l = attention(qb, kb, vb, scale, bb, causal)
        outs.append(o[0].transpose(0, 1))
        clss.append(c[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(clss, 0), torch.cat(lses, 1)


def attention_varlen_backward(dout, dcls, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, scale,
                              key_bias=None, causal=False):
    """Closed-form gradients of :func:`attention_varlen`: (dq, dk, dv, dkey_bias or None)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    db = torch.zeros_like(key_bias) if key_bias is not None else None
    for (q0, q1), (k0, k1) in zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k)):
        qb = q[q0:q1].transpose(0, 1)[None]
        kb = k[k0:k1].transpose(0, 1)[None]
        vb = v[k0:k1].transpose(0, 1)[None]
        bb = key_bias[k0:k1][None] if key_bias is not None else None
        g_o = dout[q0:q1].transpose(0, 1)[None] if dout is not None else None
        g_c = dcls[k0:k1][None] if dcls is not None else None
        g_l = dlse[:, q0:q1][None] if dlse is not None else None
        gq, gk, gv, gb = attention_backward(g_o, g_c, g_l, qb, kb, vb, scale, bb, causal)
        dq[q0:q1] = gq[0].transpose(0, 1)
        dk[k0:k1] = gk[0].transpose(0, 1)
        dv[k0:k1] = gv[0].transpose(0, 1)
        if db is not None:
            db[k0:k1] = gb[0]
    return dq, dk, dv, db
