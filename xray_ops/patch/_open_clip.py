"""``xray_ops.patch.open_clip``: flash attention and token reduction on an open_clip model's image
tower, int8 on both towers, in place (ToMe's way: the model's own modules get subclasses).

What gets which class (image tower ``model.visual``, an open_clip VisionTransformer):
  every resblocks[i].attn (nn.MultiheadAttention)  -> MHAPatch              (attention=True)
  every resblocks[i] (ResidualAttentionBlock)      -> ClipBlockPatch        (tome or evit)
  visual.transformer (Transformer)                 -> ClipTransformerPatch  (tome or evit)
  visual (VisionTransformer)                       -> ClipViTPatch          (tome or evit)
The text tower keeps its classes; int8 quantizes its Linear layers too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.int8 import Int8Linear
from ..ops.evit import EViTConfig
from ..ops.tome import ToMeConfig, tome_key_bias
from ..quantize import quantize_
from . import _state
from ._attention import MHAPatch
from ._reduce import reduce_tokens, size_weighted_mean
from ._state import PatchState
from ._timm import check_configs


def _mask_error(what: str) -> ValueError:
    return ValueError(f"{what}: token reduction (tome/evit) changes the token count from block "
                      f"to block, so cross-attention inputs and masks cannot follow it; got "
                      f"one")


class ClipBlockPatch(nn.Module):
    """open_clip ResidualAttentionBlock with token reduction after its attention.

    Modifications:
     - the attention (patched nn.MultiheadAttention) gets ToMe's key bias log(size) and returns
       the CLS row (EViT) and the keys averaged over heads (ToMe's metric) from one pass;
     - after the attention's residual (LayerScale ls_1 as open_clip), EViT at its locations,
       then ToMe's merge; the MLP runs on the fewer tokens (ls_2 as open_clip);
     - self-attention only (no k_x / v_x / attn_mask).
    """

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None,
                v_x: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise _mask_error("k_x/v_x/attn_mask")
        st = self._xo_state
        x, st.size, st.source = self.forward_reduce(q_x, st.size, st.source)
        return x

    def forward_reduce(self, x: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor]):
        """x (B, N, C), size (B, N, 1) or None, source or None -> the same after this block."""
        st: PatchState = self._xo_state
        select = getattr(self, "evit", None)
        keep_rate = select.current_rate() if select is not None else 1.0
        r = self._xo_r
        key_bias = tome_key_bias(size) if st.prop_attn and size is not None else None
        y, cls_attn, metric = self.attn.forward_tokens(self.ln_1(x), key_bias, keep_rate < 1.0,
                                                       r > 0)
        x = x + self.ls_1(y)
        x, size, source = reduce_tokens(st, x, size=size, source=source, cls_attn=cls_attn,
                                        keep_rate=keep_rate,
                                        fuse=select.fuse if select is not None else False,
                                        metric=metric, r=r)
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x, size, source

    def extra_repr(self) -> str:
        parts = ([f"tome r={self._xo_r}"] if self._xo_r else []) + \
            (["evit"] if getattr(self, "evit", None) is not None else [])
        return "xray_ops: " + (", ".join(parts) if parts else "proportional attention")


class ClipTransformerPatch(nn.Module):
    """open_clip Transformer (the image tower's) running its blocks with token reduction.

    Modifications:
     - forward(x) starts from fresh token sizes and carries them (and sources) from block to
       block (grad checkpointing checkpoints each block with its sizes); no attn_mask.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        if attn_mask is not None:
            raise _mask_error("attn_mask")
        st: PatchState = self._xo_state
        st.reset()
        size = source = None
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.resblocks:
            if ckpt:
                x, size, source = checkpoint(blk.forward_reduce, x, size, source,
                                             use_reentrant=False)
            else:
                x, size, source = blk.forward_reduce(x, size, source)
        st.size, st.source = size, source
        return x

    def forward_intermediates(self, *args, **kwargs):
        self._xo_state.reset()
        return super().forward_intermediates(*args, **kwargs)


class ClipViTPatch(nn.Module):
    """open_clip VisionTransformer with token reduction in its blocks.

    Modifications:
     - "avg" pooling weights each token by its ToMe size (as if the merged tokens were still
       there);
     - set_step(step): advances EViT's keep-rate schedule (training).
    """

    def _global_pool(self, x: torch.Tensor):
        if self.pool_type == "avg":
            return size_weighted_mean(x, self._xo_state.size, 1), x[:, 1:]
        return super()._global_pool(x)

    def set_step(self, step: int) -> None:
        """Advance EViT's keep-rate schedule to optimizer step ``step`` (every location)."""
        _state.set_evit_step(self.transformer.resblocks, step)

    def extra_repr(self) -> str:
        return self._xo_state.describe()


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _open_clip_classes():
    try:
        from open_clip.transformer import (ResidualAttentionBlock, Transformer,
                                           VisionTransformer)
    except ImportError as e:  # pragma: no cover - open_clip is a dependency of the suite
        raise ImportError(f"xray_ops.patch.open_clip needs open_clip_torch: {e}") from None
    return ResidualAttentionBlock, Transformer, VisionTransformer


def _image_tower(model):
    _, _, VisionTransformer = _open_clip_classes()
    if isinstance(model, VisionTransformer):
        return model, ""
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return visual, "visual."
    got = type(visual).__name__ if visual is not None else "no .visual"
    raise TypeError(f"model: expected an open_clip model whose .visual is an open_clip "
                    f"VisionTransformer (CLIP, CustomTextCLIP) or that VisionTransformer, got "
                    f"{type(model).__name__} with {got}")


def _check_tower(visual, path: str, attention: bool, reduces: bool):
    ResidualAttentionBlock, Transformer, _ = _open_clip_classes()
    if hasattr(visual, "_xo_state"):
        raise RuntimeError(
            f"model: already patched ({visual._xo_state.describe()}); patching twice is an "
            f"error: call xray_ops.patch.unpatch(model) first, then patch it with the new "
            f"settings")
    tr = visual.transformer
    if type(tr) is not Transformer or not tr.batch_first:
        raise TypeError(f"{path}transformer: expected open_clip's Transformer with batch_first="
                        f"True, got {type(tr).__name__}"
                        f"{'' if type(tr) is not Transformer else ' with batch_first=False'}")
    for i, blk in enumerate(tr.resblocks):
        where = f"{path}transformer.resblocks.{i}"
        if (attention or reduces) and type(blk) is not ResidualAttentionBlock:
            raise TypeError(f"{where}: expected open_clip's ResidualAttentionBlock "
                            f"(nn.MultiheadAttention inside), got {type(blk).__name__}; this "
                            f"block type (qk_norm / scaled cosine / custom attention) is not "
                            f"supported")
        if not (attention or reduces):
            continue
        mha = blk.attn
        if type(mha) is not nn.MultiheadAttention:
            raise TypeError(f"{where}.attn: expected torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        why = []
        if not mha._qkv_same_embed_dim:
            why.append("separate q/k/v projection weights")
        if mha.bias_k is not None or mha.add_zero_attn:
            why.append("bias_k/bias_v or add_zero_attn")
        if not mha.batch_first:
            why.append("batch_first=False")
        if hasattr(blk, "ln_1_kv"):
            why.append("cross-attention (ln_1_kv)")
        if why:
            raise TypeError(f"{where}.attn: nn.MultiheadAttention with {', '.join(why)} is not "
                            f"supported")
    return tr


# ----------------------------------------------------------------------------------------------
# the patch
# ----------------------------------------------------------------------------------------------
def patch_open_clip(model: nn.Module, *, attention: bool = True,
                    evit: Optional[EViTConfig] = None, tome: Optional[ToMeConfig] = None,
                    int8=False,
                    int8_filter: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Make an open_clip model fast in place; returns it.

    Args:
        model: an open_clip CLIP / CustomTextCLIP whose ``.visual`` is open_clip's
            VisionTransformer (nn.MultiheadAttention-based ResidualAttentionBlocks), or that
            VisionTransformer itself (pretrained or not).
        attention: the image tower's attention computes with :func:`xray_ops.flash_attention`
            on the packed in_proj output.
        tome, evit: token reduction in the image tower, as :func:`xray_ops.patch.timm` (class
            token protected; "avg" pooling weighted by ToMe's sizes).
        int8: True or an :class:`xray_ops.Int8Config`: :func:`xray_ops.quantize_` on both
            towers (every nn.Linear, inference only) and, in the patched image tower, the
            attention's in_proj and out_proj.
        int8_filter: quantize_'s ``filter_fn(module, name) -> bool`` (default: every Linear
            except modules named ``head`` / ``text_projection``).

    Returns the model. state_dict keys do not change (int8 adds ``in_proj_weight_scale`` and
    ``weight_scale`` entries beside the int8 weights, as quantize_). :func:`unpatch` undoes it
    (not int8). Patching twice raises RuntimeError.

    Equivalent PyTorch: open_clip's forward with softmax attention, and ToMe's / EViT's token
    reduction between each image block's attention and its MLP.
    """
    int8_cfg = check_configs(attention, tome, evit, int8, int8_filter)
    reduces = tome is not None or evit is not None
    visual, path = _image_tower(model)
    tr = _check_tower(visual, path, attention, reduces)
    depth = len(tr.resblocks)
    if evit is not None:
        evit.check_depth(depth)
    state = PatchState("open_clip", attention, tome, evit, int8_cfg, 1, True, False)
    blocks = list(tr.resblocks)
    if attention:
        for blk in blocks:
            _state.swap_class(state, blk.attn, MHAPatch)
    if reduces:
        rs = tome.schedule(depth) if tome is not None else [0] * depth
        locations = set(evit.locations) if evit is not None else set()
        for i, blk in enumerate(blocks):
            added = {"_xo_state": state, "_xo_r": max(0, rs[i])}
            if i in locations:
                added["evit"] = evit.make_select()
            _state.swap_class(state, blk, ClipBlockPatch, added)
        _state.swap_class(state, tr, ClipTransformerPatch, {"_xo_state": state})
        _state.swap_class(state, visual, ClipViTPatch)
    if int8_cfg is not None:
        _quantize_both_towers(model, int8_cfg, int8_filter, blocks if attention else [])
    visual._xo_state = state
    return model


def _quantize_both_towers(model, config, filter_fn, patched_blocks) -> None:
    # open_clip casts text inputs to its blocks' weight dtype, read from mlp.c_fc unless the
    # layer carries int8_original_dtype (its hook for int8 layers): keep that the float dtype
    float_dtypes = {}
    for name, m in model.named_modules():
        fc = getattr(getattr(m, "mlp", None), "c_fc", None)
        if isinstance(fc, nn.Linear):
            float_dtypes[name] = fc.weight.dtype
    quantize_(model, config, filter_fn or _state.default_int8_filter(("head", "text_projection")))
    for name, m in model.named_modules():
        fc = getattr(getattr(m, "mlp", None), "c_fc", None)
        if isinstance(fc, Int8Linear) and name in float_dtypes:
            fc.int8_original_dtype = float_dtypes[name]
    for blk in patched_blocks:
        blk.attn.quantize_int8()
