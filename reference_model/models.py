"""The three stage models: MAEModel, HashtagModel, CLIPModel.

Each takes images (B, 3, H, W) or clips (B, 3, T, H, W) in [0, 1] and normalises them itself
(ImageNet mean / std, timm's default), so data never has to.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import xray_ops as xo
from torch import nn

from . import losses
from .heads import HashtagHead, MAEDecoder, Projection, patchify
from .vit import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std over the channel dim (dim 1) of images or clips; no state_dict entry."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected images (B, 3, H, W) or clips (B, 3, T, H, W) in "
                             f"[0, 1], got {got}")
        shape = (1, 3) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)


def _check_vit(vit) -> VisionTransformer:
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit: expected a reference_model VisionTransformer (create_vit), got "
                        f"{type(vit).__name__}")
    return vit


class MAEModel(nn.Module):
    """Stage 1: masked autoencoding (He et al. 2022; Feichtenhofer et al. 2022 for video).

    forward(x in [0, 1], noise=None) -> (loss, pred (B, L, t*p*p*3), mask (B, L)).
    Per-sample random masking (mask_ratio for images, video_mask_ratio for clips; defaults
    from the vit's config: 0.75 / 0.9); the encoder sees only the visible tokens (the vit's
    EViT / ToMe stay off unless ``reduce_tokens``, then unmerged for the decoder); a light
    decoder (cfg.decoder_*) predicts every patch; the loss is MSE on the
    masked patches' per-patch normalised pixels (norm_pix_loss).
    """

    def __init__(self, vit: VisionTransformer, *, mask_ratio: Optional[float] = None,
                 video_mask_ratio: Optional[float] = None, norm_pix_loss: bool = True,
                 reduce_tokens: bool = False):
        super().__init__()
        self.vit = _check_vit(vit)
        cfg = vit.cfg
        self.mask_ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        self.video_mask_ratio = cfg.video_mask_ratio if video_mask_ratio is None \
            else video_mask_ratio
        for name in ("mask_ratio", "video_mask_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
        self.norm_pix_loss = norm_pix_loss
        self.reduce_tokens = reduce_tokens
        self.normalize = Normalize()
        self.decoder = MAEDecoder(cfg, ops=vit.ops)

    def ratio_for(self, x: torch.Tensor) -> float:
        is_video = x.dim() == 5 and x.shape[2] > 1
        return self.video_mask_ratio if is_video else self.mask_ratio

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None):
        x = self.normalize(x)
        enc = self.vit.forward_masked(x, self.ratio_for(x), noise=noise,
                                      reduce_tokens=self.reduce_tokens)
        pred = self.decoder(enc.tokens, enc.ids_restore, enc.grid)
        target = patchify(x, self.vit.cfg.patch_size, self.vit.cfg.tubelet_size)
        loss = losses.mae_loss(pred, target, enc.mask, norm_pix=self.norm_pix_loss)
        return loss, pred, enc.mask


class HashtagModel(nn.Module):
    """Stage 2: multi-label hashtag classification on the pooled ViT features.

    forward(x in [0, 1]) -> logits (B, num_tags); loss(logits, targets (B, num_tags) multi-hot)
    with ``loss_kind`` "bce" or "softmax" (:func:`reference_model.losses.hashtag_loss`).
    EViT / ToMe run as the vit is configured.
    """

    def __init__(self, vit: VisionTransformer, num_tags: int, *, loss_kind: str = "bce"):
        super().__init__()
        self.vit = _check_vit(vit)
        if isinstance(num_tags, bool) or not isinstance(num_tags, int) or num_tags < 1:
            raise ValueError(f"num_tags: expected an int >= 1, got {num_tags!r}")
        if loss_kind not in ("bce", "softmax"):
            raise ValueError(f"loss_kind: expected 'bce' or 'softmax', got {loss_kind!r}")
        self.num_tags = num_tags
        self.loss_kind = loss_kind
        self.normalize = Normalize()
        self.head = HashtagHead(vit.embed_dim, num_tags)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled ViT features (B, embed_dim) of inputs in [0, 1]."""
        return self.vit.forward_head(self.vit.forward_features(self.normalize(x)),
                                     pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return losses.hashtag_loss(logits, targets, self.loss_kind)


class CLIPModel(nn.Module):
    """Stage 3: contrastive image-text learning (CLIP) with a text tower from text.py.

    encode_image(x in [0, 1]) -> (B, embed_dim) L2-normalised; encode_text(list[str]) ->
    (B, embed_dim) L2-normalised; forward(x, captions) -> (image_emb, text_emb, logit_scale)
    where logit_scale = exp(learnable log-scale) clamped to ``max_logit_scale`` (CLIP: starts
    at 1/0.07, at most 100). loss(image_emb, text_emb, logit_scale, text_emb2=None) = the
    symmetric InfoNCE (``xray_ops.contrastive_loss`` with ops="xray", else
    :func:`reference_model.losses.clip_loss`) + ``siamese_weight`` x the caption siamese loss
    when a second caption's embedding is given.
    """

    def __init__(self, vit: VisionTransformer, text_tower: nn.Module, *,
                 embed_dim: Optional[int] = None, init_logit_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = 100.0, siamese_weight: float = 0.5):
        super().__init__()
        self.vit = _check_vit(vit)
        if not isinstance(text_tower, nn.Module) or not hasattr(text_tower, "output_dim"):
            raise TypeError(f"text_tower: expected a text tower module with output_dim "
                            f"(reference_model.text), got {type(text_tower).__name__}")
        embed_dim = embed_dim or vit.cfg.embed_dim_clip
        self.text_tower = text_tower
        self.normalize = Normalize()
        self.visual_proj = Projection(vit.embed_dim, embed_dim)
        self.text_proj = Projection(text_tower.output_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.siamese_weight = siamese_weight
        self.embed_dim = embed_dim

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.vit.forward_head(self.vit.forward_features(self.normalize(x)), pre_logits=True)
        e = self.visual_proj(f)
        return F.normalize(e, dim=-1) if normalize else e

    def encode_text(self, captions: list[str], normalize: bool = True) -> torch.Tensor:
        e = self.text_proj(self.text_tower(captions))
        return F.normalize(e, dim=-1) if normalize else e

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, x: torch.Tensor, captions: list[str]):
        return self.encode_image(x), self.encode_text(captions), self.scale()

    def loss_terms(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                   logit_scale: torch.Tensor,
                   text_emb2: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{"clip", "siamese" (when text_emb2 is given), "total"}."""
        if self.vit.ops == "xray":   # tiled: the (B, B) logits are never stored
            clip = xo.contrastive_loss(image_emb, text_emb, logit_scale)
        else:
            clip = losses.clip_loss(image_emb, text_emb, logit_scale)
        terms = {"clip": clip}
        total = terms["clip"]
        if text_emb2 is not None:
            terms["siamese"] = losses.caption_siamese_loss(text_emb, text_emb2)
            total = total + self.siamese_weight * terms["siamese"]
        terms["total"] = total
        return terms

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             text_emb2: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.loss_terms(image_emb, text_emb, logit_scale, text_emb2)["total"]
