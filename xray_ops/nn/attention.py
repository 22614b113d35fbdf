"""Attention: a drop-in for timm's Attention that computes with xray_ops.flash_attention."""

from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from ..ops.attention import flash_attention, flash_attention_qkvpacked


def _per_key_bias(attn_mask: torch.Tensor, B: int, N: int, dtype) -> Optional[torch.Tensor]:
    """attn_mask as a (B, N) key_bias when it is the same for every head and query, else None.

    Bool masks (True = attend, SDPA's convention) become 0 / -inf; float masks are additive.
    """
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, B) \
            or m.shape[3] != N:
        return None
    m = m[:, 0, 0, :].expand(B, N)
    if m.dtype == torch.bool:
        return torch.zeros(B, N, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype)


def _mask_to_bias(attn_mask: torch.Tensor, dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as ``timm.layers.Attention``.

    The same constructor and parameter/submodule names as timm 1.0's Attention (``qkv``,
    ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``), so a
    timm state_dict loads as it is and :meth:`from_timm` wraps an existing module (sharing its
    parameters). Computes with :func:`xray_ops.flash_attention` (on the packed qkv projection
    when there is no q/k norm: no permute copy either way), and can also take a per-key bias
    and return the CLS-attention row.

    forward(x (B, N, C), attn_mask=None, is_causal=False, *, key_bias=None,
    return_cls_attn=False) -> y (B, N, dim_out), or (y, cls_attn (B, N)) with return_cls_attn.

    - key_bias (B, N): added to every logit of key j (ToMe's proportional attention:
      ``size.log()``).
    - attn_mask: timm/SDPA semantics (bool: True = attend; float: additive), broadcastable to
      (B, H, N, N). A mask that is the same for every head and query (shape (B, 1, 1, N) or
      (N,)) joins key_bias on the flash path; any other mask, and attention dropout while
      training, run an explicit softmax attention (correct, not fast).
    - is_causal: top-left causal mask (as SDPA); not together with attn_mask (as SDPA).

    Equivalent PyTorch: timm's ``Attention.forward`` with ``fused_attn=False`` (plus the
    key_bias added to the logits, and cls_attn = the softmax's row 0 averaged over heads).
    """

    # timm's flag for "uses a fused attention kernel": always, here
    fused_attn = True

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer: expected a normalization layer class when qk_norm or "
                             "scale_norm is True, got None")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module) -> "Attention":
        """An Attention computing with flash attention on ``module``'s own submodules.

        ``module`` is a ``timm.layers.Attention`` (or anything with its attributes); the
        parameters are shared, not copied, and the state_dict keys are the same.
        """
        missing = [n for n in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop",
                               "num_heads", "head_dim", "scale") if not hasattr(module, n)]
        if missing:
            raise TypeError(f"module: expected a timm Attention, got {type(module).__name__} "
                            f"without {missing}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim, new.scale = module.num_heads, module.head_dim, module.scale
        new.attn_dim = new.num_heads * new.head_dim
        for name in ("qkv", "q_norm", "k_norm", "attn_drop"):
            setattr(new, name, getattr(module, name))
        new.norm = getattr(module, "norm", None) or nn.Identity()
        new.gate = getattr(module, "gate", None)
        new.proj, new.proj_drop = module.proj, module.proj_drop
        new.train(module.training)
        return new

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, *, key_bias: Optional[torch.Tensor] = None,
                return_cls_attn: bool = False):
        B, N, _ = x.shape
        if attn_mask is not None and is_causal:
            raise ValueError("attn_mask: expected None when is_causal=True (as torch SDPA), "
                             "got a mask")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        dropout = self.training and self.attn_drop.p > 0
        bias = key_bias
        general_mask = None
        if attn_mask is not None:
            mask_bias = _per_key_bias(attn_mask, B, N, x.dtype)
            if mask_bias is None:
                general_mask = attn_mask
            else:
                bias = mask_bias if bias is None else bias + mask_bias
        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        cls_attn = None
        if dropout or general_mask is not None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out, cls_attn = self._explicit(self.q_norm(q), self.k_norm(k), v, bias, general_mask,
                                           is_causal, dropout)
        elif plain_qk:
            res = flash_attention_qkvpacked(qkv, causal=is_causal, scale=self.scale,
                                            key_bias=bias, return_cls_attn=return_cls_attn)
            out, cls_attn = res if return_cls_attn else (res, None)
        else:
            # q/k norms normalise each head's last dim: apply them in (B, N, H, D) and hand
            # the kernels transposed views (no copy)
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q), self.k_norm(k)
            res = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  causal=is_causal, scale=self.scale, key_bias=bias,
                                  return_cls_attn=return_cls_attn)
            out, cls_attn = res if return_cls_attn else (res, None)
        # out is (B, H, N, D) stored as (B, N, H, D): this reshape is a view
        y = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        y = self.norm(y)
        if gate is not None:
            y = y * gate
        y = self.proj_drop(self.proj(y))
        return (y, cls_attn) if return_cls_attn else y

    def _explicit(self, q, k, v, key_bias, attn_mask, is_causal, dropout):
        """Softmax attention with a general mask and/or attention dropout (no flash path)."""
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if key_bias is not None:
            attn = attn + key_bias.to(attn.dtype)[:, None, None, :]
        if attn_mask is not None:
            attn = attn + _mask_to_bias(attn_mask, attn.dtype)
        if is_causal:
            n_q, n_k = attn.shape[-2:]
            keep = torch.ones(n_q, n_k, dtype=torch.bool, device=attn.device).tril()
            attn = attn.masked_fill(~keep, float("-inf"))
        attn = attn.softmax(dim=-1)
        cls_attn = attn[:, :, 0, :].mean(1)
        attn = self.attn_drop(attn) if dropout else attn
        return attn @ v, cls_attn
