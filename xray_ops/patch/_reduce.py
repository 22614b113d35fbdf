"""Token reduction after a block's attention: EViT's reorganization, then ToMe's merge.

Shared by the timm and open_clip block patches. Both steps keep the model's leading tokens
(``prefix`` = class, distillation and register tokens) in front and untouched:

* ToMe. With exactly a class token (or [class, distillation] tokens) the merge is ToMe's own
  (``class_token`` / ``distill_token``), so numbers and token order equal ToMe's patch. With
  other prefixes (registers), the merge runs on the view that starts at the last prefix token,
  with that token protected as ToMe protects a class token: the patch tokens then sit at the
  same parities as in a class-token-only model, and the other prefix tokens are put back in
  front. Without any prefix token nothing is protected.
* EViT ranks the patch tokens by the class token's attention row (so it needs a class token
  at position 0) and runs on the view that starts at the last prefix token in the same way.

Sizes (ToMe's ``size``, what proportional attention and size-weighted averages read): a kept
token keeps its size; EViT's fused token is a new token (a cls_attn-weighted sum, not a mean of
the dropped ones) and gets size 1, so proportional attention does not weight it as the many
tokens it summarises.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.evit import evit_keep_count, evit_select
from ..ops.tome import tome_merge, tome_merge_source
from ._state import PatchState


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)


def _identity_source(x: torch.Tensor) -> torch.Tensor:
    B, N = x.shape[:2]
    return torch.eye(N, device=x.device).expand(B, N, N)


def evit_step(state: PatchState, x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float,
              fuse: bool, size: Optional[torch.Tensor], source: Optional[torch.Tensor],
              metric: Optional[torch.Tensor]):
    """EViT after this block's attention: keep the ceil(keep_rate · n) patch tokens the class
    token attends to most, fuse the rest into one token.

    x (B, N, C); cls_attn (B, N): query 0's attention row from the attention kernel (head
    mean); size (B, N, 1) / source (B, N, N0) / metric (B, N, Cm) or None: reorganized along.
    Returns (x, size, source, metric) with N' = P + keep (+ 1 fused) tokens.
    """
    P = state.prefix_tokens
    N = x.shape[1]
    n_patch = N - P
    if n_patch < 2:
        return x, size, source, metric
    keep = evit_keep_count(n_patch, keep_rate)
    if keep >= n_patch:  # EViT leaves the tokens as they are
        return x, size, source, metric
    lead = P - 1  # the view starts at the last prefix token: its row passes through unchanged
    # under autocast the attention (and so cls_attn) may be bf16 while the residual is fp32
    attn = cls_attn[:, P:].to(x.dtype)
    x_out, keep_idx = evit_select(x[:, lead:], attn, keep, fuse=fuse)
    if lead:
        x_out = torch.cat([x[:, :lead], x_out], dim=1)
    if metric is not None:
        m_out, _ = evit_select(metric[:, lead:], attn.to(metric.dtype), keep, fuse=fuse)
        metric = torch.cat([metric[:, :lead], m_out], dim=1) if lead else m_out
    if size is not None:
        kept = size[:, P:].gather(1, keep_idx[..., None])
        parts = [size[:, :P], kept] + ([_ones(kept)[:, :1]] if fuse else [])
        size = torch.cat(parts, dim=1)
    if source is not None:
        rows = source[:, P:]
        kept = rows.gather(1, keep_idx[..., None].expand(-1, -1, rows.shape[2]))
        parts = [source[:, :P], kept]
        if fuse:
            # sources are disjoint 0/1 rows: all rows minus the kept ones = the dropped ones
            parts.append((rows.sum(1, keepdim=True) - kept.sum(1, keepdim=True)).clamp(0, 1))
        source = torch.cat(parts, dim=1)
    return x_out, size, source, metric


def tome_step(state: PatchState, x: torch.Tensor, metric: torch.Tensor, r: int,
              size: Optional[torch.Tensor], source: Optional[torch.Tensor]):
    """ToMe's merge of r tokens after this block's attention (see the module doc for the
    protected prefix). Returns (x, size, source) with N - r tokens (r clamped as ToMe).

    The sizes come out detached: they are counts (merges of ones), whose gradient is zero, as
    in ToMe; so the key bias log(size) asks the attention backward for no gradient either."""
    x, size, source = _tome_merge_protected(state, x, metric, r, size, source)
    return x, size.detach(), source


def _tome_merge_protected(state, x, metric, r, size, source):
    P = state.prefix_tokens
    trace = state.trace_source
    if trace and source is None:
        source = _identity_source(x)
    if P == 0 or (P == 1 and state.class_token) or (P == 2 and state.distill_token):
        res = tome_merge(x, metric, r, size=size, class_token=P >= 1,
                         distill_token=P == 2, return_match=trace)
        if trace:
            x, size, match = res
            source = tome_merge_source(match, source)
        else:
            x, size = res
        return x, size, source
    lead = P - 1
    if size is None:
        size = _ones(x)
    res = tome_merge(x[:, lead:], metric[:, lead:], r, size=size[:, lead:], class_token=True,
                     return_match=trace)
    x_out, size_out = res[:2]
    x = torch.cat([x[:, :lead], x_out], dim=1)
    size = torch.cat([size[:, :lead], size_out], dim=1)
    if trace:
        source = torch.cat([source[:, :lead], tome_merge_source(res[2], source[:, lead:])],
                           dim=1)
    return x, size, source


def reduce_tokens(state: PatchState, x: torch.Tensor, *, size, source, cls_attn, keep_rate: float,
                  fuse: bool, metric, r: int):
    """EViT (when cls_attn is given) then ToMe (when r > 0) after one block's attention."""
    if cls_attn is not None:
        x, size, source, metric = evit_step(state, x, cls_attn, keep_rate, fuse, size, source,
                                            metric)
    if r > 0:
        x, size, source = tome_step(state, x, metric, r, size, source)
    return x, size, source


def size_weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor], start: int) -> torch.Tensor:
    """Average pooling over tokens start: as if the merged tokens were still there: each token
    weighted by its ToMe size (ToMe's MAE patch does the same). (B, N, C) -> (B, C)."""
    if size is None:
        return x[:, start:].mean(dim=1)
    w = size[:, start:].to(x.dtype)
    return (x[:, start:] * w).sum(dim=1) / w.sum(dim=1)
