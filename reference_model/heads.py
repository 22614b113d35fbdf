"""Heads: MAE's light decoder (with patchify), the hashtag classifier, the CLIP projections."""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from torch import nn

from .configs import ViTConfig
from .patch_embed import add_pos_embed
from .vit import Block


def patchify(x: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """Pixels -> one row per token, in the order the ViT flattens its tokens ((t, h, w)).

    Images (B, C, H, W) -> (B, H/p * W/p, t*p*p*C): the image repeated over the t frames of a
    tubelet (an image is a one-frame clip, as the patch embedding inflates it). Clips
    (B, C, T, H, W) -> (B, T/t * H/p * W/p, t*p*p*C). Each row is ordered (t, p_h, p_w, C).
    """
    p, t = patch_size, tubelet_size
    if x.dim() == 5 and x.shape[2] == 1:
        x = x[:, :, 0]
    if x.dim() == 4:
        x = x.unsqueeze(2).expand(-1, -1, t, -1, -1)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // t, t, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)


class MAEDecoder(nn.Module):
    """MAE's light decoder: visible tokens + mask tokens back in place -> pixels per patch.

    forward(tokens (B, 1 + L_keep, C_enc), ids_restore (B, L), grid (T, H, W)) ->
    pred (B, L, t*p*p*3), each row ordered as :func:`patchify`'s.
    Position embeddings are separable (space + time) like the encoder's, interpolated to the
    grid. Blocks are the encoder's Block (ops="xray" attention on xray_ops).
    """

    def __init__(self, cfg: ViTConfig, ops: str = "xray", in_chans: int = 3):
        super().__init__()
        D = cfg.decoder_dim
        gh, gw = cfg.grid_size
        self.base_grid = (gh, gw)
        self.decoder_embed = nn.Linear(cfg.embed_dim, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, D))
        self.decoder_time_embed = nn.Parameter(torch.zeros(1, cfg.time_size, D))
        self.decoder_blocks = nn.ModuleList([
            Block(D, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, ops=ops)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_pred = nn.Linear(D, cfg.tubelet_size * cfg.patch_size ** 2 * in_chans)
        for prm in (self.mask_token, self.decoder_pos_embed, self.decoder_time_embed):
            trunc_normal_(prm, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid) -> torch.Tensor:
        x = self.decoder_embed(tokens)
        B, n, D = x.shape
        L = ids_restore.shape[1]
        T, H, W = grid
        if T * H * W != L:
            raise ValueError(f"grid: expected T*H*W == L = {L} (ids_restore), got {grid}")
        masked = self.mask_token.to(x.dtype).expand(B, L - (n - 1), D)
        patches = torch.cat([x[:, 1:], masked], 1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, D))
        patches = add_pos_embed(patches.view(B, T, H, W, D), self.decoder_pos_embed,
                                self.decoder_time_embed, self.base_grid)
        h = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], patches], 1)
        for blk in self.decoder_blocks:
            h, _ = blk(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]


class HashtagHead(nn.Linear):
    """Linear classifier over a hashtag vocabulary: pooled features (B, C) -> logits (B, K).

    The bias starts at log(prior) for a 1/K tag frequency (sigmoid(bias) = 1/K), so BCE starts
    near the loss of the label prior instead of log 2 per tag.
    """

    def __init__(self, in_features: int, num_tags: int):
        super().__init__(in_features, num_tags)
        trunc_normal_(self.weight, std=0.02)
        nn.init.constant_(self.bias, -math.log(max(num_tags - 1, 1)))


class Projection(nn.Linear):
    """Bias-free linear projection into the joint image-text space (CLIP's)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        nn.init.normal_(self.weight, std=in_features ** -0.5)
