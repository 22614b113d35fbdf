"""``xray_ops.quantize_``: int8 inference for whole models, in place.

Every selected nn.Linear becomes an :class:`~xray_ops.nn.Int8Linear` (int8 weights,
per-output-channel symmetric; per-token dynamic int8 activations). In a ViT block (timm's
Block, or any module with ``norm1`` → ``attn.qkv`` and ``norm2`` → ``mlp.fc1``) the two
LayerNorms become :class:`~xray_ops.nn.Int8LayerNorm`, so LayerNorm + quantization is one pass
(``layernorm_quant``) and qkv / fc1 take its int8 output directly; fc1's exact GELU moves into
the GEMM epilogue. Optional SmoothQuant (Xiao et al., 2023) first migrates activation outliers
of those LayerNorm outputs into the weights, with factors calibrated on inputs you pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import _validate
from .nn.int8 import Int8LayerNorm, Int8Linear


@dataclasses.dataclass
class Int8Config:
    """How :func:`quantize_` quantizes a model.

    smooth_alpha: None (no SmoothQuant) or the migration strength α in [0, 1]: for a LayerNorm
        feeding Linear layers, input channel j is scaled by s_j = max|X_j|^α / max|W_j|^(1-α)
        (LayerNorm weight and bias divided by s, the Linears' weight columns multiplied by s),
        which leaves the float model's function unchanged and flattens outlier channels.
    calibration: the sample inputs SmoothQuant measures max|X_j| on: a tensor (one batch) or
        an iterable of batches, each passed as ``model(batch)``. Required with smooth_alpha.
    fuse_layernorm: LayerNorm → qkv / fc1 as one layernorm_quant pass (see module doc).
    fuse_gelu: move the exact GELU after fc1 of a timm Mlp into fc1's GEMM epilogue.
    """

    smooth_alpha: float | None = None
    calibration: torch.Tensor | Sequence[torch.Tensor] | None = None
    fuse_layernorm: bool = True
    fuse_gelu: bool = True


def _ln_pairs(model: nn.Module):
    """(block name, norm name, norm, [(linear name, linear)]) for each LayerNorm that feeds
    only the input projection of a timm-style block: norm1 → attn.qkv, norm2 → mlp.fc1."""
    pairs = []
    for name, m in model.named_modules():
        for norm_attr, sub_attr, lin_attr in (("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")):
            norm = getattr(m, norm_attr, None)
            sub = getattr(m, sub_attr, None)
            lin = getattr(sub, lin_attr, None) if sub is not None else None
            if isinstance(norm, nn.LayerNorm) and lin is not None:
                prefix = f"{name}." if name else ""
                pairs.append((f"{prefix}{norm_attr}", norm,
                              f"{prefix}{sub_attr}.{lin_attr}", lin))
    return pairs


@torch.no_grad()
def smooth_(model: nn.Module, calibration, alpha: float,
            filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, torch.Tensor]:
    """SmoothQuant migration in place on the float model; returns {norm name: s}.

    Runs ``model(batch)`` for every calibration batch, recording the per-channel max |x| at the
    output of each LayerNorm that feeds qkv / fc1, then folds s into the LayerNorm (÷ s) and
    the Linear's weight columns (× s). Only pairs whose Linear the filter selects are smoothed.

    Equivalent PyTorch, per pair (act_max: per-channel max |LayerNorm output| on calibration)::

        s = act_max ** alpha / linear.weight.abs().amax(0) ** (1 - alpha)
        norm.weight /= s; norm.bias /= s; linear.weight *= s
    """
    alpha = _validate.number(alpha, "smooth_alpha", lo=0.0, hi=1.0)
    if calibration is None:
        raise ValueError("calibration: SmoothQuant (smooth_alpha) needs sample inputs, got None")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration: expected at least one sample batch, got none")
    pairs = [p for p in _ln_pairs(model)
             if isinstance(p[3], nn.Linear) and (filter_fn is None or filter_fn(p[3], p[2]))
             and p[1].elementwise_affine and len(p[1].normalized_shape) == 1]
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for norm_name, norm, _, _ in pairs:
        def hook(mod, inp, out, key=norm_name):
            amax = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            stats[key] = torch.maximum(stats[key], amax) if key in stats else amax
        hooks.append(norm.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    factors = {}
    for norm_name, norm, _, lin in pairs:
        if norm_name not in stats:
            continue  # not reached by the calibration inputs
        act = stats[norm_name].clamp(min=1e-5)
        w = lin.weight.detach().abs().amax(0).float().clamp(min=1e-5)
        s = (act.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
        norm.weight.div_(s.to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        factors[norm_name] = s
    return factors


def _is_mha_projection(parent: nn.Module) -> bool:
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj
    return isinstance(parent, nn.MultiheadAttention)


@torch.no_grad()
def quantize_(model: nn.Module, config: Int8Config | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Quantize ``model`` for int8 inference, in place; returns it.

    Args:
        model: any nn.Module (timm ViTs get the fused LayerNorm / GELU paths).
        config: :class:`Int8Config` (default: no SmoothQuant, fusions on).
        filter_fn: ``filter_fn(module, name) -> bool``: True quantizes that nn.Linear, False
            keeps it in float (torchao's convention), e.g.
            ``lambda m, name: name != "head"`` keeps the classifier head in float. Non-Linear
            layers (the patch embedding's Conv2d) always stay in float. None: every nn.Linear.

    The model becomes inference-only: int8 ops have no autograd, so its remaining float
    parameters get requires_grad=False. The state_dict keeps the Linear key names
    (``weight`` is now int8, plus ``weight_scale``); a quantized model's state_dict loads into
    another model quantized the same way.

    Equivalent PyTorch (per selected Linear): ``Int8Linear.from_float(linear)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = Int8Config() if config is None else config
    if not isinstance(config, Int8Config):
        raise TypeError(f"config: expected an xray_ops.Int8Config, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, name) -> bool, "
                        f"got {type(filter_fn).__name__}")
    _validate.boolean(config.fuse_layernorm, "config.fuse_layernorm")
    _validate.boolean(config.fuse_gelu, "config.fuse_gelu")
    if config.smooth_alpha is not None:
        smooth_(model, config.calibration, config.smooth_alpha, filter_fn)

    def selected(m, name):
        return filter_fn is None or bool(filter_fn(m, name))

    swaps = []
    for parent_name, parent in model.named_modules():
        if _is_mha_projection(parent):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and selected(child, name):
                swaps.append((parent, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, Int8Linear.from_float(child))

    if config.fuse_gelu:
        for m in model.modules():
            act = getattr(m, "act", None)
            # timm's Mlp: fc1 → act → drop1 → norm → fc2, fc1's output feeds only act
            if (type(m).__name__ == "Mlp" and isinstance(getattr(m, "fc1", None), Int8Linear)
                    and type(act) is nn.GELU and act.approximate == "none"
                    and m.fc1.activation is None):
                m.fc1.activation = "gelu"
                m.act = nn.Identity()
    if config.fuse_layernorm:
        for _, norm, _, lin in _ln_pairs(model):
            if (isinstance(lin, Int8Linear) and isinstance(norm, nn.LayerNorm)
                    and not isinstance(norm, Int8LayerNorm) and len(norm.normalized_shape) == 1):
                Int8LayerNorm.convert_(norm)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantized_linears(model: nn.Module) -> Iterable[tuple[str, Int8Linear]]:
    """(name, module) of every Int8Linear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]
