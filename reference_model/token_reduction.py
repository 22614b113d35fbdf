"""EViT and ToMe inside the reference model's blocks.

A block reduces its tokens between the attention (residual added) and the MLP, as both
papers do:
- EViT at the blocks of ``EViTConfig.locations``: keep the patch tokens the CLS token attends
  to most, fuse the rest into one token. The ranking is the ``cls_attn`` row the attention
  kernel returned (no second attention pass). Keep rate follows EViT's warm-up schedule
  (``xray_ops.nn.EViTSelect``; the model's ``set_step`` advances it).
- ToMe at every other block with ``ToMeConfig.schedule(depth)[i] > 0``: merge r tokens by
  bipartite soft matching of the keys averaged over heads, and (prop_attn) pass
  ``log(size)`` as the next attentions' key bias.
Both at once: EViT at its locations, ToMe at the others. Tokens carry a size (B, N, 1) once
ToMe merged; EViT's kept tokens keep theirs, its fused token counts as one.

ops="xray" runs xray_ops.evit_select / xray_ops.tome_merge; ops="torch" the anchors' PyTorch
(:mod:`reference_model.torch_baseline`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import xray_ops as xo

from . import torch_baseline


@dataclasses.dataclass
class BlockReduction:
    """What one block does to its tokens after attention (no parameters).

    evit: an ``xray_ops.nn.EViTSelect`` (keep rate and schedule) or None; tome_r: tokens ToMe
    merges (0 = none); prop_attn: pass log(size) to this block's attention.
    """

    evit: Optional[torch.nn.Module] = None
    tome_r: int = 0
    prop_attn: bool = True

    @property
    def wants_cls_attn(self) -> bool:
        return self.evit is not None and self.evit.current_rate() < 1.0

    @property
    def wants_metric(self) -> bool:
        return self.tome_r > 0


def plan(depth: int, evit: Optional[xo.EViTConfig], tome: Optional[xo.ToMeConfig]):
    """Per-block :class:`BlockReduction` for a model of ``depth`` blocks (validates both)."""
    if evit is not None and not isinstance(evit, xo.EViTConfig):
        raise TypeError(f"evit: expected an xray_ops.EViTConfig or None, got "
                        f"{type(evit).__name__}")
    if tome is not None and not isinstance(tome, xo.ToMeConfig):
        raise TypeError(f"tome: expected an xray_ops.ToMeConfig or None, got "
                        f"{type(tome).__name__}")
    if tome is not None and tome.trace_source:
        raise ValueError("tome: trace_source=True is not supported by the reference model "
                         "(use xray_ops.tome_merge(..., return_match=True) directly)")
    locations = ()
    if evit is not None:
        evit.check_depth(depth)
        locations = evit.locations
    rs = tome.schedule(depth) if tome is not None else [0] * depth
    prop = tome.prop_attn if tome is not None else False
    return [BlockReduction(evit=evit.make_select() if i in locations else None,
                           tome_r=0 if i in locations else max(0, rs[i]), prop_attn=prop)
            for i in range(depth)]


def key_bias(size: Optional[torch.Tensor], prop_attn: bool) -> Optional[torch.Tensor]:
    """Proportional attention's (B, N) key bias log(size), or None (no merge yet / off)."""
    if size is None or not prop_attn:
        return None
    return size[..., 0].log()


def apply_evit(ops: str, select, x: torch.Tensor, cls_attn: torch.Tensor,
               size: Optional[torch.Tensor]):
    """EViT after a block's attention: x (B, N, C), cls_attn (B, N) (CLS row over all keys)."""
    scores = cls_attn[:, 1:].to(x.dtype)
    if ops == "torch":
        rate = select.current_rate()
        keep = xo.evit_keep_count(x.shape[1] - 1, rate)
        x, size, _ = torch_baseline.evit_torch(x, scores, keep, select.fuse, size)
        return x, size
    x_out, keep_idx = select(x, scores)
    if keep_idx is None or size is None:
        return x_out, size
    parts = [size[:, :1], size[:, 1:].gather(1, keep_idx[..., None])]
    if x_out.shape[1] > 1 + keep_idx.shape[1]:   # the fused token: one new token
        parts.append(torch.ones_like(size[:, :1]))
    return x_out, torch.cat(parts, 1)


def apply_tome(ops: str, r: int, x: torch.Tensor, metric: torch.Tensor,
               size: Optional[torch.Tensor]):
    """ToMe after a block's attention: merge r tokens of x (B, N, C) by metric (B, N, Cm)."""
    if min(r, (x.shape[1] - 1) // 2) <= 0:
        return x, size
    if ops == "torch":
        return torch_baseline.tome_torch(x, metric, r, size)
    if size is not None:
        size = size.to(x.dtype)
    return xo.tome_merge(x, metric, r, size=size)
