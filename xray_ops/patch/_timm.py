"""``xray_ops.patch.timm``: flash attention, ToMe, EViT and int8 for a timm VisionTransformer,
in place, by giving the model's own modules small subclasses (ToMe's way of patching).

What gets which class:
  every blocks[i].attn (timm.layers.Attention)  -> TimmAttentionPatch  (attention=True)
  every blocks[i] (timm Block)                   -> TimmBlockPatch      (tome or evit)
  the model (VisionTransformer or a subclass)    -> TimmViTPatch        (tome or evit)
Parameters, buffers and state_dict keys are untouched (int8 aside: quantize_ changes dtypes).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.evit import EViTConfig
from ..ops.tome import ToMeConfig, tome_key_bias
from ..quantize import Int8Config, quantize_
from . import _state
from ._attention import TimmAttentionPatch
from ._reduce import reduce_tokens, size_weighted_mean
from ._state import PatchState

# the timm attributes the patched forward_features reads, in its order
_EMBED_STEPS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre")


class TimmBlockPatch(nn.Module):
    """timm Block with token reduction after its attention.

    Modifications:
     - the attention gets ToMe's proportional-attention key bias, log(size), and returns the
       CLS attention row (EViT) and the keys averaged over heads (ToMe's metric) from the same
       flash-attention pass;
     - after the attention's residual (LayerScale ls1 and drop_path1 applied as timm does),
       EViT reorganizes the tokens (in the blocks of evit.locations), then ToMe merges r
       tokens; the MLP then runs on the fewer tokens (ls2, drop_path2 as timm);
     - the token sizes (and sources) travel in the model's shared PatchState.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask/is_causal: token reduction (tome/evit) changes the token "
                             "count from block to block, so a mask cannot follow it; got "
                             f"attn_mask {'set' if attn_mask is not None else 'None'}, "
                             f"is_causal={is_causal}")
        st = self._xo_state
        x, st.size, st.source = self.forward_reduce(x, st.size, st.source)
        return x

    def forward_reduce(self, x: torch.Tensor, size: Optional[torch.Tensor],
                       source: Optional[torch.Tensor]):
        """x (B, N, C), size (B, N, 1) or None, source or None -> the same after this block."""
        st: PatchState = self._xo_state
        select = getattr(self, "evit", None)
        keep_rate = select.current_rate() if select is not None else 1.0
        want_cls = keep_rate < 1.0
        r = self._xo_r
        key_bias = tome_key_bias(size) if st.prop_attn and size is not None else None
        y, cls_attn, metric = self.attn.forward_tokens(self.norm1(x), key_bias, want_cls, r > 0)
        x = x + self.drop_path1(self.ls1(y))
        x, size, source = reduce_tokens(st, x, size=size, source=source, cls_attn=cls_attn,
                                        keep_rate=keep_rate,
                                        fuse=select.fuse if select is not None else False,
                                        metric=metric, r=r)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source

    def extra_repr(self) -> str:
        parts = []
        if self._xo_r:
            parts.append(f"tome r={self._xo_r}")
        if getattr(self, "evit", None) is not None:
            parts.append("evit")
        return "xray_ops: " + (", ".join(parts) if parts else "proportional attention")


class TimmViTPatch(nn.Module):
    """timm VisionTransformer with token reduction in its blocks.

    Modifications:
     - forward_features runs the embedding steps as timm, then the blocks with the token sizes
       (and sources) carried from block to block, then the final norm; grad checkpointing
       checkpoints each block with its sizes;
     - pool: "avg" pooling weights each token by its ToMe size (as if the merged tokens were
       still there, as ToMe's MAE patch does);
     - forward_intermediates starts from fresh token sizes;
     - set_step(step): advances EViT's keep-rate schedule (training).
    The final sizes and sources stay readable as ``model._xo_state.size`` / ``.source``.
    """

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask/is_causal: token reduction (tome/evit) changes the token "
                             "count from block to block, so a mask cannot follow it; got "
                             f"attn_mask {'set' if attn_mask is not None else 'None'}, "
                             f"is_causal={is_causal}")
        st: PatchState = self._xo_state
        st.reset()
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = source = None
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                x, size, source = checkpoint(blk.forward_reduce, x, size, source,
                                             use_reentrant=False)
            else:
                x, size, source = blk.forward_reduce(x, size, source)
        st.size, st.source = size, source
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if getattr(self, "attn_pool", None) is None and pool_type == "avg":
            start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
            return size_weighted_mean(x, self._xo_state.size, start)
        return super().pool(x, pool_type)

    def forward_intermediates(self, *args, **kwargs):
        self._xo_state.reset()
        return super().forward_intermediates(*args, **kwargs)

    def set_step(self, step: int) -> None:
        """Advance EViT's keep-rate schedule to optimizer step ``step`` (every location)."""
        _state.set_evit_step(self.blocks, step)

    def extra_repr(self) -> str:
        return self._xo_state.describe()


# ----------------------------------------------------------------------------------------------
# checks: every unsupported piece is named before anything changes
# ----------------------------------------------------------------------------------------------
def _timm_classes():
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is a dependency of the test suite
        raise ImportError(f"xray_ops.patch.timm needs timm: {e}") from None
    return Attention, Block, VisionTransformer


def _check_model(model, attention: bool, reduces: bool):
    Attention, Block, VisionTransformer = _timm_classes()
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer (timm.models."
                        f"vision_transformer.VisionTransformer or a subclass), got "
                        f"{type(model).__module__}.{type(model).__name__}")
    if _state.is_patched(model) or hasattr(model, "_xo_state"):
        raise RuntimeError(
            f"model: already patched ({model._xo_state.describe()}); patching twice is an "
            f"error: call xray_ops.patch.unpatch(model) first, then patch it with the new "
            f"settings")
    if hasattr(model, "_tome_info"):
        raise RuntimeError("model: already patched by ToMe's own tome.patch.timm; patch an "
                           "unpatched model instead")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"model.blocks: expected a non-empty nn.Sequential of timm Blocks, "
                        f"got {type(blocks).__name__}")
    for i, blk in enumerate(blocks):
        if attention or reduces:
            attn = getattr(blk, "attn", None)
            if type(attn) is not Attention:
                raise TypeError(
                    f"model.blocks.{i}.attn: expected timm.layers.Attention (the attention the "
                    f"patch replaces), got {type(attn).__module__}.{type(attn).__name__}; this "
                    f"attention variant is not supported")
        if reduces and type(blk) is not Block:
            raise TypeError(f"model.blocks.{i}: expected a timm.models.vision_transformer.Block "
                            f"(attention, then MLP, as token reduction rewrites it), got "
                            f"{type(blk).__module__}.{type(blk).__name__}")
    if reduces:
        missing = [n for n in _EMBED_STEPS + ("norm", "grad_checkpointing")
                   if not hasattr(model, n)]
        if missing:
            raise TypeError(f"model: this timm VisionTransformer lacks {missing}, which the "
                            f"token-reduction forward calls; timm >= 0.9 is supported")
    return blocks


def _missing_attention_attrs(attn) -> dict:
    """Attributes of timm 1.0's Attention that older timm versions lack (no gate, no scale
    norm): the patched forward reads them, unpatch removes them again."""
    defaults = {"gate": None, "norm": nn.Identity(), "attn_dim": attn.num_heads * attn.head_dim}
    return {k: v for k, v in defaults.items() if not hasattr(attn, k)}


def _prefix(model):
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    class_token = getattr(model, "cls_token", None) is not None
    distill = (getattr(model, "dist_token", None) is not None and class_token and prefix == 2
               and getattr(model, "reg_token", None) is None)
    return prefix, class_token, distill


def _as_int8(int8) -> Optional[Int8Config]:
    if int8 is False or int8 is None:
        return None
    if int8 is True:
        return Int8Config()
    if isinstance(int8, Int8Config):
        return int8
    raise TypeError(f"int8: expected a bool or an xray_ops.Int8Config, got "
                    f"{type(int8).__name__} ({int8!r})")


def check_configs(attention, tome, evit, int8, int8_filter):
    if not isinstance(attention, bool):
        raise TypeError(f"attention: expected a bool, got {type(attention).__name__} "
                        f"({attention!r})")
    if tome is not None and not isinstance(tome, ToMeConfig):
        raise TypeError(f"tome: expected None or an xray_ops.ToMeConfig, got "
                        f"{type(tome).__name__} ({tome!r})")
    if evit is not None and not isinstance(evit, EViTConfig):
        raise TypeError(f"evit: expected None or an xray_ops.EViTConfig, got "
                        f"{type(evit).__name__} ({evit!r})")
    if (tome is not None or evit is not None) and not attention:
        raise ValueError("attention: token reduction (tome/evit) takes the CLS row and the keys "
                         "from the patched attention, so it needs attention=True, got False")
    if int8_filter is not None and not callable(int8_filter):
        raise TypeError(f"int8_filter: expected a callable (module, name) -> bool, got "
                        f"{type(int8_filter).__name__}")
    return _as_int8(int8)


# ----------------------------------------------------------------------------------------------
# the patch
# ----------------------------------------------------------------------------------------------
def patch_timm(model: nn.Module, *, attention: bool = True, evit: Optional[EViTConfig] = None,
               tome: Optional[ToMeConfig] = None, int8=False,
               int8_filter: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Make a timm VisionTransformer fast in place; returns it.

    Args:
        model: a timm VisionTransformer (any size; LayerScale, qk_norm, registers, no class
            token, distillation token, dynamic image size; pretrained or not).
        attention: every block's attention computes with :func:`xray_ops.flash_attention` on
            the packed qkv projection (outputs equal timm's within the dtype's tolerance).
        tome: :class:`xray_ops.ToMeConfig`: ToMe's merge after each block's attention (r per
            layer as ToMe's parse_r), proportional attention through key_bias = log(size),
            class / distillation / register tokens never merged; "avg" pooling weighted by
            size.
        evit: :class:`xray_ops.EViTConfig`: EViT's reorganization after the attention of the
            blocks in ``evit.locations``, ranked by the CLS row the attention kernel returns
            (needs a class token). ``model.set_step(step)`` advances its keep-rate schedule.
        int8: True or an :class:`xray_ops.Int8Config`: :func:`xray_ops.quantize_` (inference
            only), the classifier head(s) kept in float.
        int8_filter: quantize_'s ``filter_fn(module, name) -> bool`` instead of the default
            (every Linear except ``head`` / ``head_dist``); e.g. ``lambda m, n: True`` also
            quantizes the head.

    Returns the model. state_dict keys do not change (int8 changes dtypes, as quantize_).
    ``print(model)`` shows what was patched; :func:`xray_ops.patch.unpatch` undoes it (not the
    int8 quantization). Patching a patched model raises RuntimeError (unpatch first).
    Works in training (every patched piece has gradients; int8 is inference only) and under
    ``torch.compile(fullgraph=True)``.

    Equivalent PyTorch: timm's own forward with softmax attention (key bias added), and ToMe's
    ``bipartite_soft_matching`` + ``merge_wavg`` / EViT's top-k selection and fusion between
    each block's attention and its MLP.
    """
    int8_cfg = check_configs(attention, tome, evit, int8, int8_filter)
    reduces = tome is not None or evit is not None
    blocks = _check_model(model, attention, reduces)
    prefix, class_token, distill = _prefix(model)
    depth = len(blocks)
    if evit is not None:
        evit.check_depth(depth)
        if not class_token:
            raise ValueError("evit: EViT ranks tokens by the class token's attention, but this "
                             "model has no class token (class_token=False)")
    state = PatchState("timm", attention, tome, evit, int8_cfg, prefix, class_token, distill)
    if attention:
        for blk in blocks:
            _state.swap_class(state, blk.attn, TimmAttentionPatch,
                              _missing_attention_attrs(blk.attn))
    if reduces:
        rs = tome.schedule(depth) if tome is not None else [0] * depth
        locations = set(evit.locations) if evit is not None else set()
        for i, blk in enumerate(blocks):
            added = {"_xo_state": state, "_xo_r": max(0, rs[i])}
            if i in locations:
                added["evit"] = evit.make_select()
            _state.swap_class(state, blk, TimmBlockPatch, added)
        _state.swap_class(state, model, TimmViTPatch)
    if int8_cfg is not None:
        quantize_(model, int8_cfg,
                  int8_filter or _state.default_int8_filter(("head", "head_dist")))
    model._xo_state = state
    return model
