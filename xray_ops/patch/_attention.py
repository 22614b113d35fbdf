"""The attention of patched blocks: xray_ops.flash_attention on the packed qkv projection, with
ToMe's key bias and the two by-products token reduction needs (EViT's CLS row, ToMe's metric).

Two mixins, one per attention module kind they are swapped onto:
  TimmAttentionPatch  timm.layers.Attention (fused ``qkv`` Linear, q_norm / k_norm, gate, ...)
  MHAPatch            torch.nn.MultiheadAttention as open_clip's ResidualAttentionBlock uses it
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import Attention as XrayAttention
from ..nn.int8 import Int8Linear
from ..ops.attention import flash_attention, flash_attention_qkvpacked
from ..ops.int8 import int8_linear
from ..reference.int8 import quantize_weight


def _explicit_attention(q, k, v, scale: float, key_bias, dropout_p: float):
    """Softmax attention with attention dropout (training only; no flash path takes dropout).

    q, k, v (B, H, N, D) -> out (B, H, N, D), cls_attn (B, N) (row 0 before dropout)."""
    s = (q * scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        s = s + key_bias.to(s.dtype)[:, None, None, :]
    p = s.softmax(dim=-1)
    cls_attn = p[:, :, 0, :].mean(1)
    return F.dropout(p, dropout_p, training=True) @ v, cls_attn


def attend_packed(qkv: torch.Tensor, scale: float, *, q_norm: Optional[nn.Module] = None,
                  k_norm: Optional[nn.Module] = None, key_bias: Optional[torch.Tensor] = None,
                  want_cls: bool = False, want_metric: bool = False, dropout_p: float = 0.0):
    """Self-attention on timm's packed projection, with what token reduction needs.

    Args:
        qkv: (B, N, 3, H, D) as ``qkv_linear(x).reshape(B, N, 3, H, D)``.
        q_norm, k_norm: per-head norms of q and k (timm's qk_norm), None for none.
        key_bias: (B, N) added to every logit of key j (ToMe: log(size)).
        want_cls: also return cls_attn (B, N), the head-mean attention row of query 0 (EViT).
        want_metric: also return ToMe's metric (B, N, D), the keys (after k_norm) averaged over
            heads, as ToMe's ``k.mean(1)``.
        dropout_p: attention dropout (training): an explicit softmax path, else flash.

    Returns:
        (out (B, N, H * D), cls_attn or None, metric or None).

    Equivalent PyTorch::

        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0); q, k = q_norm(q), k_norm(k)
        P = (scale * q @ k.transpose(-1, -2) + key_bias[:, None, None, :]).softmax(-1)
        out = (P @ v).transpose(1, 2).reshape(B, N, H * D)
        cls_attn, metric = P[:, :, 0].mean(1), k.mean(1)
    """
    B, N, _, H, D = qkv.shape
    plain = q_norm is None and k_norm is None
    metric = None
    if plain and dropout_p == 0.0:
        if want_metric:
            metric = qkv[:, :, 1].mean(2)
        res = flash_attention_qkvpacked(qkv, scale=scale, key_bias=key_bias,
                                        return_cls_attn=want_cls)
        out, cls_attn = res if want_cls else (res, None)
    else:
        # norms act on each head's last dim: apply them in (B, N, H, D) and hand the kernels
        # transposed views (no copy)
        q, k, v = qkv.unbind(2)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        if want_metric:
            metric = k.mean(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if dropout_p > 0.0:
            out, cls_attn = _explicit_attention(q, k, v, scale, key_bias, dropout_p)
        else:
            res = flash_attention(q, k, v, scale=scale, key_bias=key_bias,
                                  return_cls_attn=want_cls)
            out, cls_attn = res if want_cls else (res, None)
    # flash's out is (B, H, N, D) stored as (B, N, H, D): this reshape is a view
    out = out.transpose(1, 2).reshape(B, N, H * D)
    return out, (cls_attn if want_cls else None), metric


class TimmAttentionPatch(XrayAttention):
    """timm Attention computing with xray_ops.flash_attention.

    Modifications:
     - forward(x, attn_mask, is_causal): xray_ops.nn.Attention's forward (flash attention on
       the packed qkv, no permute copy; q_norm/k_norm, scale_norm, gate, attn_mask and
       attention dropout as timm); same parameters, same state_dict keys.
     - forward_tokens(x, key_bias, want_cls, want_metric): the same attention with ToMe's
       proportional-attention key bias, returning EViT's CLS row and ToMe's metric (the keys
       averaged over heads) from the same pass.
    """

    def forward_tokens(self, x, key_bias=None, want_cls=False, want_metric=False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q_norm = None if isinstance(self.q_norm, nn.Identity) else self.q_norm
        k_norm = None if isinstance(self.k_norm, nn.Identity) else self.k_norm
        dropout_p = self.attn_drop.p if self.training else 0.0
        y, cls_attn, metric = attend_packed(qkv, self.scale, q_norm=q_norm, k_norm=k_norm,
                                            key_bias=key_bias, want_cls=want_cls,
                                            want_metric=want_metric, dropout_p=dropout_p)
        y = self.norm(y)
        if gate is not None:
            y = y * gate
        return self.proj_drop(self.proj(y)), cls_attn, metric

    def extra_repr(self) -> str:
        return "xray_ops: flash_attention"


class MHAPatch(nn.Module):
    """torch.nn.MultiheadAttention (self-attention, batch_first) computing with
    xray_ops.flash_attention.

    Modifications:
     - forward(query, key, value, ...): when query, key and value are the same (B, N, E) tensor
       and no attention weights, key_padding_mask or attn_mask are asked for, flash attention on
       the packed in_proj output; anything else runs nn.MultiheadAttention's own forward.
     - forward_tokens(x, key_bias, want_cls, want_metric): that attention with ToMe's key bias,
       EViT's CLS row and ToMe's metric, as the timm patch.
     - with int8: in_proj_weight becomes an int8 buffer with in_proj_weight_scale beside it,
       out_proj an xray_ops.nn.Int8Linear (inference only).
    """

    def _in_proj(self, x: torch.Tensor) -> torch.Tensor:
        w = self.in_proj_weight
        if w.dtype == torch.int8:
            return int8_linear(x, w, self.in_proj_weight_scale, self.in_proj_bias)
        return F.linear(x, w, self.in_proj_bias)

    def forward_tokens(self, x, key_bias=None, want_cls=False, want_metric=False):
        B, N, E = x.shape
        qkv = self._in_proj(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        dropout_p = self.dropout if self.training else 0.0
        y, cls_attn, metric = attend_packed(qkv, self.head_dim ** -0.5, key_bias=key_bias,
                                            want_cls=want_cls, want_metric=want_metric,
                                            dropout_p=dropout_p)
        return self.out_proj(y), cls_attn, metric

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        fast = (query is key and key is value and query.dim() == 3 and self.batch_first
                and key_padding_mask is None and not need_weights and attn_mask is None
                and not is_causal)
        if not fast:
            if self.in_proj_weight.dtype == torch.int8:
                raise RuntimeError(
                    "xray_ops.patch: this int8 nn.MultiheadAttention runs only as "
                    "self-attention with need_weights=False and no masks (its in_proj weight is "
                    f"int8); got need_weights={need_weights}, key_padding_mask "
                    f"{'set' if key_padding_mask is not None else 'None'}, attn_mask "
                    f"{'set' if attn_mask is not None else 'None'}, is_causal={is_causal}")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        y, _, _ = self.forward_tokens(query)
        return y, None

    def quantize_int8(self) -> None:
        """in_proj and out_proj to int8 (per-output-channel weights), in place."""
        w_q, w_scale = quantize_weight(self.in_proj_weight.detach())
        del self.in_proj_weight
        self.register_buffer("in_proj_weight", w_q)
        self.register_buffer("in_proj_weight_scale", w_scale)
        if self.in_proj_bias is not None:
            self.in_proj_bias.requires_grad_(False)
        self.out_proj = Int8Linear.from_float(self.out_proj)

    def extra_repr(self) -> str:
        base = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        int8 = ", int8" if self.in_proj_weight.dtype == torch.int8 else ""
        return f"{base}, xray_ops: flash_attention{int8}"
