"""EViT token reorganization (Liang et al., ICLR 2022): the definition, in plain PyTorch.

This is the op's definition and test oracle (it runs in any float dtype, float64 included) and
the ``torch`` backend. Ranking: patch tokens in descending order of cls_attn, ties broken by the
lower index first, NaN ranked above every number (what a stable descending torch.sort does).
Every backend reproduces that order exactly.
"""

from __future__ import annotations

import torch


def appends_fused_token(n_tokens: int, keep: int, fuse: bool) -> bool:
    """Whether x_out ends with a fused token: only with fuse and something to fuse
    (keep < N-1). With keep == N-1 nothing is dropped, and EViT appends nothing."""
    return bool(fuse) and keep < n_tokens - 1


def evit_rank_order(cls_attn: torch.Tensor) -> torch.Tensor:
    """(B, N-1) -> (B, N-1) int64: patch indices sorted by descending cls_attn, stable."""
    return torch.sort(cls_attn, dim=1, descending=True, stable=True).indices


def evit_select(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool = True):
    """x (B, N, C), cls_attn (B, N-1) -> x_out (B, 1 + keep + fused, C), keep_idx (B, keep).

    x_out = [x[:, :1], the kept patch tokens in keep_idx order, fused token], where
    fused = sum over dropped patch tokens j of cls_attn[:, j] * x[:, 1 + j] (not renormalised),
    present only when fuse and keep < N-1 (:func:`appends_fused_token`).
    Differentiable (through PyTorch autograd) in x and cls_attn.
    """
    B, N, C = x.shape
    fuse = appends_fused_token(N, keep, fuse)
    order = evit_rank_order(cls_attn)
    keep_idx = order[:, :keep].contiguous()
    patches = x[:, 1:]
    kept = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(B, keep, C))
    parts = [x[:, :1], kept]
    if fuse:
        drop_idx = order[:, keep:]
        dropped = torch.gather(patches, 1, drop_idx.unsqueeze(-1).expand(B, N - 1 - keep, C))
        w = torch.gather(cls_attn, 1, drop_idx).unsqueeze(-1)
        parts.append((w * dropped).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), keep_idx


def evit_select_backward(grad_out: torch.Tensor, x: torch.Tensor, cls_attn: torch.Tensor,
                         keep: int, fuse: bool = True):
    """Gradients of :func:`evit_select` in closed form: (grad_x (B, N, C), grad_cls (B, N-1)).

    grad_x[:, 0] = grad_out[:, 0]; a kept token gets the gradient of its output slot; a dropped
    token j gets cls_attn[j] * grad_fused. grad_cls[j] = <x[1 + j], grad_fused> for dropped j,
    0 for kept j (the selection itself carries no gradient).
    """
    B, N, C = x.shape
    fuse = appends_fused_token(N, keep, fuse)
    order = evit_rank_order(cls_attn)
    keep_idx = order[:, :keep]
    grad_x = torch.zeros_like(x)
    grad_cls = torch.zeros_like(cls_attn)
    grad_x[:, 0] = grad_out[:, 0]
    grad_patches = grad_x[:, 1:]
    grad_patches.scatter_(1, keep_idx.unsqueeze(-1).expand(B, keep, C), grad_out[:, 1:1 + keep])
    if fuse:
        drop_idx = order[:, keep:]
        g_fused = grad_out[:, 1 + keep]  # (B, C)
        w = torch.gather(cls_attn, 1, drop_idx)  # (B, D)
        grad_patches.scatter_(1, drop_idx.unsqueeze(-1).expand(-1, -1, C),
                              w.unsqueeze(-1) * g_fused.unsqueeze(1))
        dropped = torch.gather(x[:, 1:], 1, drop_idx.unsqueeze(-1).expand(-1, -1, C))
        grad_cls.scatter_(1, drop_idx, (dropped * g_fused.unsqueeze(1)).sum(-1))
    return grad_x, grad_cls
