"""Step-by-step reference forwards for the drop-in patches (xray_ops.patch), written on the
*unpatched* model's own modules with plain PyTorch and the ops' reference definitions:

    per block: LayerNorm -> softmax attention with key bias log(size) (explicit, float64-capable)
               -> residual (LayerScale, drop_path) -> EViT as its code (top-k of the CLS row,
               gather, fuse the rest) -> ToMe's merge (xray_ops.reference.tome, the definition)
               -> MLP residual.

Protected prefix tokens (class, registers, distillation) follow the semantics the patch
documents: ToMe's own class/distill handling when the prefix is [cls] or [cls, dist]; otherwise
the merge runs on [last prefix token, patches] with that token protected as a class token.
"""

from __future__ import annotations

import math

import torch

from xray_ops.reference import tome as ref_tome
from xray_ops.reference.attention import attention as ref_attention


def _attention(attn, h, size, prop_attn):
    """timm Attention (or an nn.MultiheadAttention as open_clip uses it) on h (B, N, C):
    -> (y, cls_attn (B, N), keys (B, H, N, D)) computed explicitly."""
    B, N, _ = h.shape
    if isinstance(attn, torch.nn.MultiheadAttention):
        H = attn.num_heads
        qkv = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scale = q.shape[-1] ** -0.5
    else:
        H = attn.num_heads
        qkv = attn.qkv(h).reshape(B, N, 3, H, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scale = attn.scale
    bias = size[..., 0].log() if (prop_attn and size is not None) else None
    out, cls_attn, _ = ref_attention(q, k, v, scale, bias)
    y = out.transpose(1, 2).reshape(B, N, -1)
    if isinstance(attn, torch.nn.MultiheadAttention):
        y = attn.out_proj(y)
    else:
        y = attn.proj(attn.norm(y))
    return y, cls_attn, k


def _evit(x, cls_attn, metric, size, prefix, keep_rate, fuse):
    """EViT's Block after its attention (youweiliang/evit), patch tokens after ``prefix``."""
    B, N, C = x.shape
    n = N - prefix
    left = math.ceil(keep_rate * n)
    if left >= n:
        return x, metric, size
    attn = cls_attn[:, prefix:]
    _, idx = torch.topk(attn, left, dim=1, largest=True, sorted=True)
    keep = torch.zeros(B, n, dtype=torch.bool)
    keep.scatter_(1, idx, True)

    def reorganize(t):
        others = t[:, prefix:]
        kept = torch.gather(others, 1, idx[..., None].expand(-1, -1, t.shape[2]))
        parts = [t[:, :prefix], kept]
        if fuse:
            # EViT's complement_idx: the dropped tokens; their cls_attn-weighted sum
            w = torch.where(keep, torch.zeros_like(attn), attn)
            parts.append((others * w[..., None]).sum(1, keepdim=True))
        return torch.cat(parts, dim=1)

    x = reorganize(x)
    metric = reorganize(metric) if metric is not None else None
    if size is not None:
        kept = torch.gather(size[:, prefix:], 1, idx[..., None])
        parts = [size[:, :prefix], kept] + ([torch.ones_like(kept[:, :1])] if fuse else [])
        size = torch.cat(parts, dim=1)
    return x, metric, size


def _tome(x, metric, size, r, prefix, distill):
    if prefix <= 1 or distill:
        return ref_tome.tome_merge(x, metric, r, size, class_token=prefix >= 1,
                                   distill_token=distill)
    lead = prefix - 1
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
    xo_, so = ref_tome.tome_merge(x[:, lead:], metric[:, lead:], r, size[:, lead:], True, False)
    return torch.cat([x[:, :lead], xo_], 1), torch.cat([size[:, :lead], so], 1)


def blocks_forward(blocks, x, *, rs, prefix, distill=False, prop_attn=True, evit=None,
                   open_clip=False):
    """Run ``blocks`` (timm Blocks or open_clip ResidualAttentionBlocks) step by step.

    rs: ToMe's r per block; evit: (keep_rate, locations, fuse) or None.
    Returns (x, size)."""
    size = None
    for i, blk in enumerate(blocks):
        norm1, ls1 = (blk.ln_1, blk.ls_1) if open_clip else (blk.norm1, blk.ls1)
        y, cls_attn, k = _attention(blk.attn, norm1(x), size, prop_attn)
        x = x + (ls1(y) if open_clip else blk.drop_path1(blk.ls1(y)))
        metric = k.mean(1) if rs[i] > 0 else None
        if evit is not None and i in evit[1]:
            x, metric, size = _evit(x, cls_attn, metric, size, prefix, evit[0], evit[2])
        if rs[i] > 0:
            x, size = _tome(x, metric, size, rs[i], prefix, distill)
            size = size.detach()
        if open_clip:
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        else:
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size


def timm_forward(model, images, *, rs, evit=None, prop_attn=True):
    """timm VisionTransformer.forward with the blocks run step by step (pool "avg" weighted by
    size, "token" as timm)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    prefix = model.num_prefix_tokens
    distill = getattr(model, "dist_token", None) is not None and prefix == 2
    x, size = blocks_forward(model.blocks, x, rs=rs, prefix=prefix, distill=distill,
                             prop_attn=prop_attn, evit=evit)
    x = model.norm(x)
    if model.global_pool == "avg":
        w = size[:, prefix:] if size is not None else torch.ones_like(x[:, prefix:, :1])
        pooled = (x[:, prefix:] * w).sum(1) / w.sum(1)
        return model.head(model.head_drop(model.fc_norm(pooled)))
    return model.forward_head(x)
