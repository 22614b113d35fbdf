"""EViTSelect: EViT's token reorganization as a module, with EViT's keep-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate
from ..ops.evit import evit_keep_count, evit_select


class EViTSelect(nn.Module):
    """Keep the most CLS-attended patch tokens, fuse the rest (Liang et al., ICLR 2022).

    Keep-rate schedule as EViT trains it: 1.0 for the first ``warmup_steps`` steps, then a
    cosine from 1.0 down to ``keep_rate`` over ``shrink_steps`` steps, then ``keep_rate``.
    Evaluation (``model.eval()``) always uses ``keep_rate``. The training loop advances the
    schedule with :meth:`set_step`.

    forward(x (B, N, C), cls_attn (B, N-1)) -> (x_out (B, 1 + keep + fuse, C), keep_idx (B, keep)),
    or (x, None) unchanged when nothing would be dropped: while the scheduled keep rate is 1,
    and while it keeps every patch token (keep == N-1, a rate just under 1), as EViT skips the
    step then (so the token count never grows).

    Equivalent PyTorch: ``xray_ops.reference.evit.evit_select(x, cls_attn, keep, fuse)`` with
    ``keep = math.ceil(rate * (N - 1))``.
    """

    def __init__(self, keep_rate: float, *, fuse: bool = True, warmup_steps: int = 0,
                 shrink_steps: int = 0):
        super().__init__()
        self.keep_rate = _validate.number(keep_rate, "keep_rate", lo=0.0, hi=1.0, lo_open=True)
        self.fuse = _validate.boolean(fuse, "fuse")
        self.warmup_steps = _validate.integer(warmup_steps, "warmup_steps", lo=0)
        self.shrink_steps = _validate.integer(shrink_steps, "shrink_steps", lo=0)
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = _validate.integer(step, "step", lo=0)

    def rate_at(self, step: int) -> float:
        """The scheduled keep rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return 1.0
        t = step - self.warmup_steps
        if self.shrink_steps == 0 or t >= self.shrink_steps:
            return self.keep_rate
        cos = 0.5 * (1.0 + math.cos(math.pi * t / self.shrink_steps))
        return self.keep_rate + (1.0 - self.keep_rate) * cos

    def current_rate(self) -> float:
        return self.rate_at(self.step) if self.training else self.keep_rate

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor):
        rate = self.current_rate()
        if rate >= 1.0:
            return x, None
        keep = evit_keep_count(x.shape[1] - 1, rate)
        if keep >= x.shape[1] - 1:
            return x, None
        return evit_select(x, cls_attn, keep, fuse=self.fuse)

    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, fuse={self.fuse}, warmup_steps={self.warmup_steps}, "
                f"shrink_steps={self.shrink_steps}")
