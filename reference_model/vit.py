"""VisionTransformer / Block / Mlp / Attention with timm's names, for images and video.

State-dict keys are timm's VisionTransformer's (cls_token, pos_embed, patch_embed.proj,
blocks.i.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}, norm, fc_norm, head)
plus ``time_embed`` (the video model's temporal position embedding). A timm state_dict loads
strictly: the 2-D patch kernel is inflated over time and ``time_embed`` starts at zero, so
images give timm's outputs.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import xray_ops as xo
from timm.layers import DropPath, LayerScale, Mlp as TimmMlp, trunc_normal_
from torch import nn

from . import token_reduction as tr
from .configs import ViTConfig
from .patch_embed import TubeletEmbed, add_pos_embed, spatial_pos_embed
from .torch_baseline import TorchAttention

OPS = ("xray", "torch")


def check_ops(ops) -> str:
    if ops not in OPS:
        raise ValueError(f"ops: expected one of {OPS}, got {ops!r}")
    return ops


class XrayAttention(xo.nn.Attention):
    """``xray_ops.nn.Attention`` plus :meth:`attend`: the CLS row and ToMe's metric in one pass.

    Same parameters and names as timm's Attention.
    """

    def attend(self, x: torch.Tensor, *, key_bias: Optional[torch.Tensor] = None,
               want_cls: bool = False, want_metric: bool = False, is_causal: bool = False):
        """x (B, N, C) -> (y (B, N, C), cls_attn (B, N) or None, metric (B, N, D) or None).

        One xray_ops.flash_attention_qkvpacked call on the packed projection; cls_attn is the
        head mean of query 0's softmax row (over all N keys, CLS included) that the kernel
        returns with the output; metric the keys averaged over heads (ToMe's).
        """
        dropout = self.training and self.attn_drop.p > 0
        if not want_metric or dropout:
            out = self.forward(x, is_causal=is_causal, key_bias=key_bias,
                               return_cls_attn=want_cls)
            y, cls_attn = out if want_cls else (out, None)
            metric = None
            if want_metric:   # attention dropout: the explicit path; recompute the keys
                B, N, _ = x.shape
                k = F.linear(x, self.qkv.weight, self.qkv.bias).view(
                    B, N, 3, self.num_heads, self.head_dim)[:, :, 1]
                metric = self.k_norm(k).mean(2)
            return y, cls_attn, metric
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            raise NotImplementedError("XrayAttention.attend: q/k norms with ToMe")
        metric = qkv[:, :, 1].mean(2)
        res = xo.flash_attention_qkvpacked(qkv, causal=is_causal, scale=self.scale,
                                           key_bias=key_bias, return_cls_attn=want_cls)
        out, cls_attn = res if want_cls else (res, None)
        # out is (B, H, N, D) stored as (B, N, H, D): this reshape is a view
        y = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        y = self.proj_drop(self.proj(self.norm(y)))
        return y, cls_attn, metric


class Mlp(TimmMlp):
    """timm's Mlp (fc1, act, drop1, norm, fc2, drop2); ops="xray" fuses fc1's bias and the
    GELU into one ``xray_ops.bias_gelu`` pass after a bias-free matmul.

    Equivalent PyTorch: ``fc2(drop1(gelu(fc1(x))))`` (then drop2), as timm's Mlp.
    """

    def __init__(self, *args, ops: str = "xray", **kwargs):
        super().__init__(*args, **kwargs)
        self.ops = check_ops(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # xray_ops.quantize_ swaps fc1 for an Int8Linear (GELU in its epilogue): timm's path
        if self.ops != "xray" or type(self.fc1) is not nn.Linear \
                or not isinstance(self.act, nn.GELU):
            return super().forward(x)
        h = xo.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias,
                         approximate=self.act.approximate)
        return self.drop2(self.fc2(self.norm(self.drop1(h))))


class Block(nn.Module):
    """Pre-norm transformer block with timm's names, and EViT / ToMe after its attention.

    forward(x (B, N, C), size=None, is_causal=False, slots=None) -> (x (B, N', C), size) where
    N' < N when this block reduces tokens and size (B, N', 1) counts the original tokens each
    token holds (None until ToMe first merges). With ``slots`` (B, L) (where each of L tracked
    tokens now sits in x) it returns (x, size, slots) with the slots after this block's
    reduction (MAE's unmerge). ``reduction`` (no parameters) says what the block does;
    :meth:`VisionTransformer.set_token_reduction` sets it.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, drop_path: float = 0.0,
                 ops: str = "xray"):
        super().__init__()
        self.ops = check_ops(ops)
        attn_cls = XrayAttention if ops == "xray" else TorchAttention
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU,
                       ops=ops)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # a plain attribute, not a submodule: switching EViT / ToMe never changes the
        # state_dict or the parameter list (EViTSelect has neither parameters nor buffers)
        self.reduction = tr.BlockReduction()

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                is_causal: bool = False, slots: Optional[torch.Tensor] = None):
        red = self.reduction
        if red.evit is not None:
            red.evit.train(self.training)
        want_cls, want_metric = red.wants_cls_attn, red.wants_metric
        bias = tr.key_bias(size, red.prop_attn)
        y, cls_attn, metric = self.attn.attend(self.norm1(x), key_bias=bias, want_cls=want_cls,
                                               want_metric=want_metric, is_causal=is_causal)
        # (not when quantize_ made norm2 an Int8LayerNorm: it feeds fc1 int8 directly)
        if self.ops == "xray" and not (want_cls or want_metric) \
                and type(self.norm2) is nn.LayerNorm:
            # x + ls1(attn) and norm2 in one pass: (normed, new residual stream)
            h, x = self._residual_norm2(self.drop_path1(y), x)
        else:
            x = x + self.drop_path1(self.ls1(y))
            track = slots is not None
            if want_cls:
                x, size, dest = tr.apply_evit(self.ops, red.evit, x, cls_attn, size, track)
                slots = dest.gather(1, slots) if track else None
            if want_metric:
                x, size, dest = tr.apply_tome(self.ops, red.tome_r, x, metric, size, track)
                slots = dest.gather(1, slots) if track else None
            h = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(h)))
        return (x, size) if slots is None else (x, size, slots)

    def _residual_norm2(self, y: torch.Tensor, x: torch.Tensor):
        """xray_ops.layer_norm: s = x + gamma1 * y, (norm2(s), s). Equivalent PyTorch::

            s = x + self.ls1(y); return self.norm2(s), s
        """
        gamma = self.ls1.gamma if isinstance(self.ls1, LayerScale) else None
        # under autocast the branch is half precision and the residual stream float32: add
        # in the stream's dtype, as the unfused `x + ls1(y)` promotes
        return xo.layer_norm(y.to(x.dtype), self.norm2.weight, self.norm2.bias, self.norm2.eps,
                             residual=x, residual_scale=gamma)


class MaskedTokens(NamedTuple):
    """What :meth:`VisionTransformer.forward_masked` returns (MAE's encoder output).

    tokens: (B, 1 + L_keep, C) normed encoder output of CLS + the visible patch tokens;
    mask: (B, L) float, 1 = masked (hidden from the encoder), 0 = visible, in token order;
    ids_restore: (B, L) int64, the inverse of the per-sample shuffle (MAE's);
    grid: (T, H, W) of the token grid (T = 1 for images).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    grid: tuple


class VisionTransformer(nn.Module):
    """A ViT for images (B, 3, H, W) and clips (B, 3, T, H, W) with timm's names.

    Images and clips share every parameter: an image is a one-frame clip (the tubelet kernel
    inflated, :class:`TubeletEmbed`); position embeddings are separable, ``pos_embed`` (timm's,
    with CLS) over space and ``time_embed`` over tubelet time, both interpolated to the input's
    grid; attention is joint over space and time. EViT / ToMe per :meth:`set_token_reduction`.
    ops="xray" computes attention, EViT and ToMe with xray_ops; ops="torch" with the anchors'
    PyTorch (:mod:`reference_model.torch_baseline`); the state_dicts are the same.

    Equivalent timm model for images (same outputs after ``load_state_dict``)::

        timm.models.VisionTransformer(img_size, patch_size, embed_dim=..., depth=...,
                                      num_heads=..., dynamic_img_size=True, num_classes=...)
    """

    def __init__(self, cfg: ViTConfig, *, ops: str = "xray", num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        self.ops = check_ops(ops)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        D = cfg.embed_dim
        self.num_classes = num_classes
        self.num_features = self.embed_dim = D
        self.num_prefix_tokens = 1
        self.global_pool = cfg.global_pool
        self.patch_embed = TubeletEmbed(cfg.patch_size, cfg.tubelet_size, 3, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        gh, gw = cfg.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, D))
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.time_size, D))
        # stochastic depth rising linearly to drop_path_rate (timm's rule), in Python so the
        # model also builds on the meta device
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.init_values, dpr[i], ops)
            for i in range(cfg.depth)])
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, num_classes) if num_classes > 0 else nn.Identity()
        self.evit_config: Optional[xo.EViTConfig] = None
        self.tome_config: Optional[xo.ToMeConfig] = None
        self._step = 0
        self._init_weights()
        self.register_load_state_dict_pre_hook(_load_2d_checkpoint)

    # ------------------------------------------------------------------ init / checkpoints
    def _init_weights(self) -> None:
        """timm's default ViT init (trunc-normal .02 linears and position embeddings)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.time_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def base_grid(self) -> tuple[int, int]:
        return self.cfg.grid_size

    # ------------------------------------------------------------------ token reduction
    def set_token_reduction(self, evit: Optional[xo.EViTConfig] = None,
                            tome: Optional[xo.ToMeConfig] = None) -> None:
        """Switch EViT and/or ToMe on (a config) or off (None), in training and inference.

        No parameter changes, so this can be done on trained weights (the evaluation compares
        float / ToMe / EViT on the same model). EViT's schedule continues at the model's step.
        """
        plan = tr.plan(len(self.blocks), evit, tome)
        for blk, red in zip(self.blocks, plan):
            if red.evit is not None:
                red.evit.set_step(self._step)
            blk.reduction = red
        self.evit_config, self.tome_config = evit, tome

    @contextlib.contextmanager
    def token_reduction(self, evit: Optional[xo.EViTConfig] = None,
                        tome: Optional[xo.ToMeConfig] = None):
        """``with vit.token_reduction(tome=xo.ToMeConfig(r=4)): ...`` then restore the previous."""
        prev = (self.evit_config, self.tome_config)
        self.set_token_reduction(evit, tome)
        try:
            yield self
        finally:
            self.set_token_reduction(*prev)

    def set_step(self, step: int) -> None:
        """Advance EViT's keep-rate schedule to optimizer step ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        self._step = step
        for blk in self.blocks:
            if blk.reduction.evit is not None:
                blk.reduction.evit.set_step(step)

    # ------------------------------------------------------------------ forward
    def patchify_tokens(self, x: torch.Tensor):
        """Images / clips -> (patch tokens with position embeddings (B, L, C), grid (T, H, W))."""
        if x.dim() in (4, 5) and not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        p = self.patch_embed(x)
        grid = tuple(p.shape[1:4])
        return add_pos_embed(p, self.pos_embed, self.time_embed, self.base_grid), grid

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls.to(tokens.dtype), tokens], dim=1)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks (with their token reduction) and the final norm on (B, N, C)."""
        size = None
        for blk in self.blocks:
            x, size = blk(x, size)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) or clips (B, 3, T, H, W) -> normed tokens (B, 1 + L', C).

        L' = L patch tokens, fewer where EViT / ToMe removed some. H, W multiples of the patch
        size; T 1 or a multiple of the tubelet size.
        """
        tokens, _ = self.patchify_tokens(x)
        return self.forward_blocks(self._with_cls(tokens))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> pooled features (pre_logits) or head outputs, as timm."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_masked(self, x: torch.Tensor, mask_ratio: float, *,
                       noise: Optional[torch.Tensor] = None,
                       reduce_tokens: bool = False) -> MaskedTokens:
        """MAE's encoder: hide ``mask_ratio`` of each sample's patches, encode only the rest.

        Per-sample random masking as MAE: argsort of uniform noise (B, L), the first
        L_keep = int(L * (1 - mask_ratio)) kept. The blocks see CLS + the L_keep visible
        tokens only. EViT / ToMe are off unless ``reduce_tokens``: then the configured ones
        run and the output is unmerged back to one token per visible patch (a merged token
        takes its merged token's value, as ToMe's MAE patch does; an EViT-dropped one the fused
        token's, or CLS's without fusion). ``noise`` (B, L) fixes the shuffle (tests). See
        :class:`MaskedTokens`.
        """
        if not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: expected a number in [0, 1), got {mask_ratio!r}")
        tokens, grid = self.patchify_tokens(x)
        B, L, C = tokens.shape
        keep = max(1, int(L * (1.0 - mask_ratio)))
        if noise is None:
            noise = torch.rand(B, L, device=tokens.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise: expected shape {(B, L)}, got {tuple(noise.shape)}")
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, C))
        mask = torch.ones(B, L, device=tokens.device, dtype=tokens.dtype)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)
        h = self._with_cls(visible)
        if reduce_tokens:
            size, slots = None, torch.arange(1 + keep, device=h.device).expand(B, -1)
            for blk in self.blocks:
                h, size, slots = blk(h, size, slots=slots)
            h = self.norm(h).gather(1, slots[..., None].expand(-1, -1, h.shape[-1]))
            return MaskedTokens(h, mask, ids_restore, grid)
        for blk in self.blocks:
            h, _ = _plain_block(blk, h)
        return MaskedTokens(self.norm(h), mask, ids_restore, grid)


def _plain_block(blk: Block, x: torch.Tensor):
    """A block without its token reduction (MAE's encoder)."""
    red = blk.reduction
    blk.reduction = tr.BlockReduction()
    try:
        return blk(x)
    finally:
        blk.reduction = red


def _load_2d_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs):
    """Let a timm (image-only) state_dict load strictly into the image + video model.

    No ``time_embed`` in it: zeros (images then compute exactly as timm's; video starts from
    a static temporal embedding, as inflating an image model does). A ``pos_embed`` of
    another grid is resampled to this model's (as timm's checkpoint filter does). The 2-D
    patch kernel is inflated by :class:`TubeletEmbed`'s own hook.
    """
    if prefix + "pos_embed" not in state_dict:
        return
    if prefix + "time_embed" not in state_dict:
        state_dict[prefix + "time_embed"] = torch.zeros_like(module.time_embed)
    pe = state_dict[prefix + "pos_embed"]
    if pe.dim() == 3 and pe.shape[1] != module.pos_embed.shape[1]:
        old = int(round((pe.shape[1] - 1) ** 0.5))
        if old * old == pe.shape[1] - 1:
            resampled = spatial_pos_embed(pe, module.base_grid, (old, old))
            state_dict[prefix + "pos_embed"] = torch.cat([pe[:, :1], resampled], 1)
