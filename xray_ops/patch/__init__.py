"""Drop-in speedups for existing models, in one line and in place.

    import xray_ops as xo
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    xo.patch.timm(model, tome=xo.ToMeConfig(r=8), evit=xo.EViTConfig(0.7, (3, 6, 9)))
    xo.patch.open_clip(clip_model, tome=xo.ToMeConfig(r=8), int8=True)
    xo.patch.unpatch(model)      # the original classes and forward again

As ToMe's own patch does, the model's own modules get small subclasses (weights, parameter
names and state_dict keys untouched); each subclass's docstring lists its "Modifications:",
and ``print(model)`` shows what was patched. Unlike ToMe's patch, timm's LayerScale, q/k norm,
attn_mask (attention only), drop_path, registers / no class token / distillation tokens and
dynamic image size are respected, attention runs on xray_ops.flash_attention, the patched model
traces under ``torch.compile(fullgraph=True)``, and EViT and int8 combine with ToMe.

Neither timm nor open_clip is imported until a patch function runs.
"""

from __future__ import annotations

from torch import nn

from . import _state


def timm(model, *, attention=True, evit=None, tome=None, int8=False, int8_filter=None):
    """Make a timm VisionTransformer fast, in place; returns it.

    model: timm VisionTransformer (LayerScale, qk_norm, registers, no class token,
    distillation token, dynamic image size). attention: flash attention on the packed qkv.
    tome: xray_ops.ToMeConfig (merge after each block's attention, proportional attention).
    evit: xray_ops.EViTConfig (reorganize after the listed blocks' attention; needs a class
    token). int8: True or xray_ops.Int8Config (quantize_, heads in float; int8_filter to
    choose). Full description: :func:`xray_ops.patch._timm.patch_timm`.

    Equivalent PyTorch: timm's own forward, with ToMe's bipartite_soft_matching + merge_wavg /
    EViT's top-k selection and fusion between each block's attention and its MLP.
    """
    from ._timm import patch_timm

    return patch_timm(model, attention=attention, evit=evit, tome=tome, int8=int8,
                      int8_filter=int8_filter)


def open_clip(model, *, attention=True, evit=None, tome=None, int8=False, int8_filter=None):
    """Make an open_clip model fast, in place; returns it.

    model: an open_clip CLIP / CustomTextCLIP whose .visual is open_clip's VisionTransformer
    (nn.MultiheadAttention blocks), or that VisionTransformer. attention, tome, evit: as
    :func:`timm`, on the image tower. int8: both towers. Full description:
    :func:`xray_ops.patch._open_clip.patch_open_clip`.

    Equivalent PyTorch: open_clip's own forward with ToMe / EViT between each image block's
    attention and its MLP.
    """
    from ._open_clip import patch_open_clip

    return patch_open_clip(model, attention=attention, evit=evit, tome=tome, int8=int8,
                           int8_filter=int8_filter)


def _holder(model: nn.Module):
    """The module that carries the patch's state: the model, or an open_clip model's .visual."""
    if isinstance(model, nn.Module) and "_xo_state" in model.__dict__:
        return model
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and "_xo_state" in visual.__dict__:
        return visual
    return None


def state(model: nn.Module):
    """The :class:`~xray_ops.patch._state.PatchState` of a patched model (None if unpatched):
    its settings, and ToMe's ``size`` / ``source`` after the last forward."""
    holder = _holder(model)
    return holder.__dict__["_xo_state"] if holder is not None else None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`timm` / :func:`open_clip` in place; returns the model.

    Every patched module gets its original class back and loses what the patch added, so the
    forward is the library's own again (bitwise the same outputs as before patching). int8
    quantization is not undone (quantize_ replaces layers for good). ValueError if the model was
    not patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    holder = _holder(model)
    if holder is None:
        raise ValueError(f"model: expected a model patched by xray_ops.patch, got an unpatched "
                         f"{type(model).__name__}")
    _state.undo(holder.__dict__.pop("_xo_state"))
    return model


__all__ = ["timm", "open_clip", "unpatch", "state"]
