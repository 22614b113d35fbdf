"""reference_model: the Xray-Visual reference model (arXiv 2602.16918) on xray_ops.

A ViT for images and video trained MAE -> hashtag classification -> CLIP, with EViT and ToMe
on the fast ops. See reference_model/README.md for the contract between the model, the data /
evaluation and the training parts.

    from reference_model import create_vit
    vit = create_vit("tiny", evit=xray_ops.EViTConfig(keep_rate=0.7, locations=(2, 4)))
"""

from __future__ import annotations

from typing import Optional

import xray_ops as xo

from .configs import CONFIGS, ViTConfig, get_config
from .heads import MAEDecoder, patchify
from .models import CLIPModel, HashtagModel, MAEModel, Normalize
from .text import (AdapterTextTower, CLIPTextTransformer, FrozenTextEncoder,
                   caption_contrastive_finetune, create_text_tower)
from .token_reduction import plan as _plan
from .vit import Block, MaskedTokens, VisionTransformer


def create_vit(name: str, *, ops: str = "xray", num_classes: int = 0,
               img_size: Optional[int] = None,
               evit: Optional[xo.EViTConfig] = None, tome: Optional[xo.ToMeConfig] = None,
               **overrides) -> VisionTransformer:
    """A reference-model ViT from a named config: tiny, s16, b16, l16, h14.

    Args:
        name: a key of :data:`CONFIGS` (or a :class:`ViTConfig`).
        ops: "xray" (xray_ops attention / EViT / ToMe) or "torch" (the same model in the
            anchors' plain PyTorch: the speed baseline). Same state_dict either way.
        num_classes: head outputs; 0 = no head (``forward`` returns pooled features).
        img_size: the image size whose patch grid pos_embed is stored at; None = the
            config's own (224 for s16 / b16 / l16 / h14, 32 for tiny). Any multiple of the
            patch size runs (interpolated, as timm's dynamic_img_size).
        evit, tome: ``xray_ops.EViTConfig`` / ``xray_ops.ToMeConfig`` or None (see
            :meth:`VisionTransformer.set_token_reduction`, which switches them later).
        overrides: any other :class:`ViTConfig` field (depth=4, init_values=1e-5, ...).

    The parameter names are timm's, so
    ``create_vit("s16").load_state_dict(timm.create_model("vit_small_patch16_224").state_dict())``
    loads strictly.
    """
    if img_size is not None:
        overrides = {"img_size": img_size, **overrides}
    cfg = get_config(name, **overrides)
    _plan(cfg.depth, evit, tome)   # bad configs fail before any weight is built
    vit = VisionTransformer(cfg, ops=ops, num_classes=num_classes)
    if evit is not None or tome is not None:
        vit.set_token_reduction(evit, tome)
    return vit


__all__ = ["create_vit", "CONFIGS", "ViTConfig", "get_config", "VisionTransformer", "Block",
           "MaskedTokens", "MAEModel", "HashtagModel", "CLIPModel", "Normalize", "MAEDecoder",
           "patchify", "CLIPTextTransformer", "FrozenTextEncoder", "AdapterTextTower",
           "caption_contrastive_finetune", "create_text_tower"]
