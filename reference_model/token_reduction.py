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


def evit_dest(keep_idx: torch.Tensor, n: int, fuse: bool) -> torch.Tensor:
    """(B, keep) kept patch indices -> (B, n) output slot of every input token (MAE unmerge).

    CLS -> 0, the r-th kept patch -> 1 + r, a dropped patch -> the fused token's slot
    (1 + keep), or 0 (CLS) without fusion.
    """
    B, keep = keep_idx.shape
    dest = torch.full((B, n), 1 + keep if fuse else 0, dtype=torch.long, device=keep_idx.device)
    dest[:, 0] = 0
    ranks = torch.arange(1, keep + 1, device=keep_idx.device).expand(B, keep)
    return dest.scatter(1, keep_idx + 1, ranks)


def apply_evit(ops: str, select, x: torch.Tensor, cls_attn: torch.Tensor,
               size: Optional[torch.Tensor], want_dest: bool = False):
    """EViT after a block's attention: x (B, N, C), cls_attn (B, N) (CLS row over all keys).

    Returns (x, size, dest): dest (B, N) the output slot of each input token when
    ``want_dest`` (see :func:`evit_dest`), else None. A keep count of N - 1 leaves x as it is
    (EViT's rule: nothing to drop).
    """
    B, N, _ = x.shape
    keep = xo.evit_keep_count(N - 1, select.current_rate())
    if keep >= N - 1:
        return x, size, (torch.arange(N, device=x.device).expand(B, N) if want_dest else None)
    scores = cls_attn[:, 1:].to(x.dtype)
    if ops == "torch":
        x, size, keep_idx = torch_baseline.evit_torch(x, scores, keep, select.fuse, size)
    else:
        x, keep_idx = xo.evit_select(x, scores, keep, fuse=select.fuse)
        if size is not None:
            parts = [size[:, :1], size[:, 1:].gather(1, keep_idx[..., None])]
            if select.fuse:   # the fused token: one new token
                parts.append(torch.ones_like(size[:, :1]))
            size = torch.cat(parts, 1)
    return x, size, (evit_dest(keep_idx, N, select.fuse) if want_dest else None)


def apply_tome(ops: str, r: int, x: torch.Tensor, metric: torch.Tensor,
               size: Optional[torch.Tensor], want_dest: bool = False):
    """ToMe after a block's attention: merge r tokens of x (B, N, C) by metric (B, N, Cm).

    Returns (x, size, dest): dest (B, N) the output slot of each input token (a merged token
    points at the token it joined) when ``want_dest``, else None.
    """
    B, N, _ = x.shape
    if min(r, (N - 1) // 2) <= 0:
        return x, size, (torch.arange(N, device=x.device).expand(B, N) if want_dest else None)
    if ops == "torch":
        out = torch_baseline.tome_torch(x, metric, r, size, return_dest=want_dest)
        return out if want_dest else (*out, None)
    if size is not None:
        size = size.to(x.dtype)
    x, size, match = xo.tome_merge(x, metric, r, size=size, return_match=True)
    return x, size, (match.dest if want_dest else None)
