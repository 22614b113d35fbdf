"""ViTConfig and the named configs of the reference model: tiny, s16, b16, l16, h14.

The widths, depths and heads of s16 / b16 / l16 / h14 are timm's vit_small_patch16_224,
vit_base_patch16_224, vit_large_patch16_224 and vit_huge_patch14_224, so their state_dicts load
one to one (``create_vit("s16").load_state_dict(timm_model.state_dict())``).

``tiny`` is the configuration `make demo` trains through all three stages on 2 CPU cores:
a ViT-Ti width (192, 3 heads of 64: a head dim every attention kernel takes) at half the
depth (6 blocks), on 32x32 images in 4x4 patches (64 patch tokens + CLS) and 8-frame clips in
2x4x4 tubelets (4x8x8 = 256 tokens), with a 2-block, 128-wide MAE decoder and a 4-layer,
128-wide text transformer over 32 BPE tokens. About 2.7 M backbone parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that shapes a reference-model ViT (and its MAE decoder and text tower).

    Backbone (timm's names): embed_dim, depth, num_heads, mlp_ratio, qkv_bias, init_values
    (LayerScale; None = off), global_pool ("token" | "avg"), drop_rate (head dropout),
    drop_path_rate (stochastic depth), patch_size (spatial), tubelet_size (frames per
    tubelet), img_size (the grid pos_embed is stored at; any size runs: interpolated),
    num_frames (the clip length time_embed is stored for; longer clips interpolate).
    MAE: decoder_dim, decoder_depth, decoder_heads, mask_ratio (images), video_mask_ratio.
    Text transformer (CLIP tower (a)): text_width, text_depth, text_heads, context_length,
    embed_dim_clip (the joint image-text embedding width).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: Optional[float] = None
    global_pool: str = "token"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    patch_size: int = 16
    tubelet_size: int = 2
    img_size: int = 224
    num_frames: int = 16
    # MAE decoder (He et al.: 512 wide, 8 deep for ViT-B/L/H; "light": narrower and shallower)
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    video_mask_ratio: float = 0.9
    # CLIP
    embed_dim_clip: int = 512
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    context_length: int = 77

    def __post_init__(self):
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "tubelet_size",
                     "img_size", "num_frames", "decoder_dim", "decoder_depth", "decoder_heads",
                     "embed_dim_clip", "text_width", "text_depth", "text_heads",
                     "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for width, heads, what in ((self.embed_dim, self.num_heads, "embed_dim/num_heads"),
                                   (self.decoder_dim, self.decoder_heads,
                                    "decoder_dim/decoder_heads"),
                                   (self.text_width, self.text_heads, "text_width/text_heads")):
            if width % heads:
                raise ValueError(f"{what}: expected the width to be a multiple of the heads, "
                                 f"got {width}/{heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size: expected a multiple of patch_size={self.patch_size}, "
                             f"got {self.img_size}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames: expected a multiple of tubelet_size="
                             f"{self.tubelet_size}, got {self.num_frames}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: expected 'token' or 'avg', got {self.global_pool!r}")
        for name in ("mask_ratio", "video_mask_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
        for name in ("drop_rate", "drop_path_rate"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected a number > 0, got {self.mlp_ratio!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """The (H, W) patch grid pos_embed is stored at."""
        g = self.img_size // self.patch_size
        return g, g

    @property
    def time_size(self) -> int:
        """The number of temporal positions time_embed is stored for."""
        return self.num_frames // self.tubelet_size


CONFIGS: dict[str, ViTConfig] = {
    "tiny": ViTConfig(embed_dim=192, depth=6, num_heads=3, patch_size=4, tubelet_size=2,
                      img_size=32, num_frames=8, decoder_dim=128, decoder_depth=2,
                      decoder_heads=4, embed_dim_clip=128, text_width=128, text_depth=4,
                      text_heads=2, context_length=32),
    "s16": ViTConfig(embed_dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=4,
                     decoder_heads=8, embed_dim_clip=384, text_width=384, text_depth=12,
                     text_heads=6),
    "b16": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "l16": ViTConfig(embed_dim=1024, depth=24, num_heads=16, embed_dim_clip=768,
                     text_width=768, text_depth=12, text_heads=12),
    "h14": ViTConfig(embed_dim=1280, depth=32, num_heads=16, patch_size=14,
                     embed_dim_clip=1024, text_width=1024, text_depth=24, text_heads=16),
}


def get_config(name: str, **overrides) -> ViTConfig:
    """The named config with ``overrides`` applied (any ViTConfig field).

    ``get_config("tiny", depth=4)``; an unknown name or field raises a ValueError listing the
    valid ones.
    """
    if isinstance(name, ViTConfig):
        base = name
    else:
        if name not in CONFIGS:
            raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
        base = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"overrides: unknown ViTConfig fields {bad}; valid: {sorted(fields)}")
    return dataclasses.replace(base, **overrides)
