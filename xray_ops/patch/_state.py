"""PatchState: what a patch did to one model, and the token bookkeeping of the forward in flight.

One object per patched model, referenced by the model and by every patched block (ToMe's
``_tome_info``, as a typed object): the settings every block reads (its ToMe r, proportional
attention, which leading tokens are protected) and the per-forward ``size`` / ``source`` that
token merging carries from block to block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from ..ops.evit import EViTConfig
from ..ops.tome import ToMeConfig
from ..quantize import Int8Config


@dataclasses.dataclass(eq=False)
class PatchState:
    """Settings of one patched model and the token bookkeeping of its current forward.

    library:        "timm" or "open_clip".
    attention:      attention computes with xray_ops.flash_attention.
    tome, evit:     the token-reduction configs (None: off).
    int8:           the Int8Config quantize_ applied (None: float).
    prefix_tokens:  tokens in front of the patch tokens (class, distillation, registers); never
                    merged or dropped.
    class_token:    token 0 is a class token (EViT ranks by its attention row).
    distill_token:  the prefix is exactly [class, distillation] (ToMe's distill_token order).
    size, source:   ToMe's per-token sizes (B, N, 1) and sources (B, N, N0) after the last block
                    that ran (None before the first merge).
    records:        (module, original class, attribute names added) for unpatch, in patch order.
    """

    library: str
    attention: bool
    tome: Optional[ToMeConfig]
    evit: Optional[EViTConfig]
    int8: Optional[Int8Config]
    prefix_tokens: int
    class_token: bool
    distill_token: bool
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    records: list = dataclasses.field(default_factory=list)

    @property
    def reduces_tokens(self) -> bool:
        return self.tome is not None or self.evit is not None

    @property
    def prop_attn(self) -> bool:
        return self.tome is not None and self.tome.prop_attn

    @property
    def trace_source(self) -> bool:
        return self.tome is not None and self.tome.trace_source

    def reset(self) -> None:
        """Forget the previous forward's sizes and sources (start of every model forward)."""
        self.size = None
        self.source = None

    def describe(self) -> str:
        parts = [f"attention={'flash_attention' if self.attention else 'as is'}"]
        if self.tome is not None:
            parts.append(f"tome=ToMeConfig(r={self.tome.r!r}, prop_attn={self.tome.prop_attn})")
        if self.evit is not None:
            parts.append(f"evit=EViTConfig(keep_rate={self.evit.keep_rate}, "
                         f"locations={self.evit.locations}, fuse={self.evit.fuse})")
        if self.int8 is not None:
            parts.append("int8=True")
        if self.prefix_tokens:
            parts.append(f"protected prefix tokens={self.prefix_tokens}")
        return f"xray_ops.patch.{self.library}({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------
# class swapping (ToMe's way: the model's own modules get a small subclass, weights untouched)
# ----------------------------------------------------------------------------------------------
_SUBCLASSES: dict[tuple[type, type], type] = {}


def patched_class(mixin: type, base: type) -> type:
    """``class Xray<Base>(mixin, base)``, made once per (mixin, base) pair.

    The mixin goes first, so its methods win, and the result is still an instance of ``base``
    (isinstance checks elsewhere keep working). ``_xo_base`` remembers base for unpatch.
    """
    key = (mixin, base)
    if key not in _SUBCLASSES:
        name = f"Xray{base.__name__}"
        _SUBCLASSES[key] = type(name, (mixin, base), {"_xo_base": base, "_xo_mixin": mixin,
                                                      "__doc__": mixin.__doc__,
                                                      "__module__": mixin.__module__,
                                                      "__reduce_ex__": _reduce_ex})
    return _SUBCLASSES[key]


def _reduce_ex(self, protocol):
    # the subclass is made at run time, so pickle (torch.save, deepcopy) names it by its parts
    return _rebuild, (type(self)._xo_mixin, type(self)._xo_base), self.__dict__


def _rebuild(mixin: type, base: type):
    cls = patched_class(mixin, base)
    return cls.__new__(cls)


def swap_class(state: PatchState, module: nn.Module, mixin: type,
               added: dict | None = None) -> None:
    """Give ``module`` the patched subclass of its class and set ``added`` attributes on it."""
    original = type(module)
    module.__class__ = patched_class(mixin, original)
    names = []
    for name, value in (added or {}).items():
        setattr(module, name, value)
        names.append(name)
    state.records.append((module, original, tuple(names)))


def is_patched(module: nn.Module) -> bool:
    return hasattr(type(module), "_xo_base")


def undo(state: PatchState) -> None:
    """Restore every module's original class and drop the attributes the patch added."""
    for module, original, names in reversed(state.records):
        module.__class__ = original
        for name in names:
            if name in module._modules:
                del module._modules[name]
            elif name in module.__dict__:
                del module.__dict__[name]
    state.records.clear()
    state.reset()


def default_int8_filter(keep_float: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    """quantize_'s filter_fn keeping the classifier head(s) in float: any Linear whose name or
    one of its enclosing module names is in ``keep_float``."""

    def filter_fn(module: nn.Module, name: str) -> bool:
        return not any(part in keep_float for part in name.split("."))

    return filter_fn


def set_evit_step(blocks, step: int) -> None:
    """Advance the EViT keep-rate schedule of every patched block in ``blocks`` to ``step``."""
    for blk in blocks:
        select = getattr(blk, "evit", None)
        if select is not None:
            select.set_step(step)
