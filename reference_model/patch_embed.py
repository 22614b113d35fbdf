"""Tubelet patch embedding for images and clips, and the separable space + time position
embeddings (interpolated to any grid, as timm's dynamic_img_size)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn


class TubeletEmbed(nn.Module):
    """Conv3d tubelet embedding (t x p x p, stride = kernel); an image is a one-frame clip.

    ``proj`` is an ``nn.Conv3d(in_chans, embed_dim, (t, p, p))``. A clip (B, C, T, H, W) with T a
    multiple of t gives (B, T/t, H/p, W/p, D). An image (B, C, H, W) (or a clip with T == 1) is
    embedded with the temporal kernel inflated: the image repeated over the t frames of one
    tubelet, i.e. a Conv2d whose kernel is ``proj.weight.sum(2)``; it gives (B, 1, H/p, W/p, D).
    A timm (2-D) kernel (D, C, p, p) loads into ``proj.weight`` as that kernel divided by t in
    each of the t frames (:func:`inflate_patch_kernel`), so an image gives timm's output.

    Equivalent PyTorch for an image::

        F.conv2d(x, proj.weight.sum(2), proj.bias, stride=p).permute(0, 2, 3, 1)[:, None]
    """

    def __init__(self, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)
        self.register_load_state_dict_pre_hook(_inflate_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, t = self.patch_size, self.tubelet_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (4, 5) or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected images (B, {self.in_chans}, H, W) or clips "
                             f"(B, {self.in_chans}, T, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"x: expected H and W to be positive multiples of the patch size "
                             f"{p}, got shape {tuple(x.shape)}")
        if x.dim() == 5 and x.shape[2] == 1:
            x = x[:, :, 0]
        if x.dim() == 4:
            # the image repeated over t frames: conv3d of that == conv2d with the time-summed kernel
            y = F.conv2d(x, self.proj.weight.sum(2), self.proj.bias, stride=p)
            return y.permute(0, 2, 3, 1).unsqueeze(1)
        T = x.shape[2]
        if T % t:
            raise ValueError(f"x: expected a clip length T that is 1 or a multiple of the tubelet "
                             f"size {t}, got shape {tuple(x.shape)}")
        return self.proj(x).permute(0, 2, 3, 4, 1)


def inflate_patch_kernel(weight_2d: torch.Tensor, tubelet_size: int) -> torch.Tensor:
    """(D, C, p, p) -> (D, C, t, p, p): the 2-D kernel divided by t in each of the t frames.

    Summed over time it gives back the 2-D kernel (exactly for t a power of two), so an image
    embeds as with the 2-D kernel; a static clip embeds each tubelet as its frame would.
    """
    return (weight_2d / tubelet_size).unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1)


def _inflate_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs):
    key = prefix + "proj.weight"
    w = state_dict.get(key)
    if w is not None and w.dim() == 4:
        state_dict[key] = inflate_patch_kernel(w, module.tubelet_size)


def spatial_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                      base_grid: tuple[int, int]) -> torch.Tensor:
    """pos_embed (1, 1 + gh*gw, D) of the base grid -> (1, H*W, D) patch positions for ``grid``.

    Bicubic (antialiased) interpolation as timm's dynamic_img_size (timm's own
    resample_abs_pos_embed); the stored grid itself is returned as a view.
    """
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(base_grid),
                                  num_prefix_tokens=1)[:, 1:]


def temporal_pos_embed(time_embed: torch.Tensor, t: int) -> torch.Tensor:
    """time_embed (1, T0, D) -> (1, t, D) for a clip of t temporal positions.

    A clip no longer than the stored one takes the first t positions (the same frame rate);
    a longer one interpolates linearly over the stored range.
    """
    T0 = time_embed.shape[1]
    if t <= T0:
        return time_embed[:, :t]
    te = F.interpolate(time_embed.float().transpose(1, 2), size=t, mode="linear",
                       align_corners=False)
    return te.transpose(1, 2).to(time_embed.dtype)


def add_pos_embed(tokens: torch.Tensor, pos_embed: torch.Tensor, time_embed: torch.Tensor,
                  base_grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, H, W, D) tubelet tokens + space and time position embeddings -> (B, T*H*W, D).

    Separable: token (t, h, w) gets ``spatial[h, w] + temporal[t]``; tokens are flattened in
    (t, h, w) order. The CLS token's position (pos_embed[:, 0]) is added by the caller.
    """
    B, T, H, W, D = tokens.shape
    space = spatial_pos_embed(pos_embed, (H, W), base_grid).reshape(1, 1, H, W, D)
    time = temporal_pos_embed(time_embed, T).reshape(1, T, 1, 1, D)
    return (tokens + space + time).reshape(B, T * H * W, D)
