"""Schedules: learning rate (linear warm-up, then cosine) and progressive resolution.

Progressive resolution: a stage's ``phases`` say from which fraction of its steps on images are
``img_size`` pixels (and video clips ``clip_len`` frames). The batch shrinks as the token count
grows, so batch x tokens per sample — the activation memory of a ViT, to first order — stays at
its first-phase value; video steps get the same token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_warmup(step: int, steps: int, warmup: float, min_ratio: float) -> float:
    """LR factor at optimizer step ``step`` of ``steps``: linear from 1/warm to 1 over the
    warm-up (``warmup`` steps, or that fraction of ``steps`` when < 1), then a half cosine down to
    ``min_ratio``.

    Equivalent::  w = warmup if warmup >= 1 else round(warmup * steps)
                  f = (step + 1) / w if step < w else
                      min_ratio + (1 - min_ratio) * (1 + cos(pi * (step - w) / (steps - w))) / 2
    """
    w = int(warmup) if warmup >= 1 else int(round(warmup * steps))
    w = min(w, steps - 1)
    if step < w:
        return (step + 1) / w
    span = max(1, steps - w)
    t = min(1.0, (step - w) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: float, min_ratio: float):
    """A LambdaLR over :func:`cosine_warmup` (its state_dict is the step, so it resumes exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_warmup(s, steps, warmup, min_ratio))


@dataclass(frozen=True)
class StepPlan:
    """What optimizer step ``step`` trains on: a global batch of ``batch_size`` images
    (img_size²) or video clips (clip_len x img_size²) of ``tokens`` tokens each."""

    step: int
    video: bool
    img_size: int
    clip_len: int
    batch_size: int
    tokens: int
    phase: int


class ResolutionSchedule:
    """Step → :class:`StepPlan` for one stage.

    Args:
        phases: the stage's :class:`~reference_model.train.config.Phase` list.
        steps: optimizer steps in the stage.
        batch_size: global image batch of the first phase (sets the token budget).
        patch_size, tubelet: the ViT's patch size (pixels) and tubelet length (frames).
        divisor: every batch is a multiple of this (world size x accumulation steps).
        video_every: every k-th step is a video step (0: none).
    """

    def __init__(self, phases, steps: int, batch_size: int, *, patch_size: int, tubelet: int = 1,
                 divisor: int = 1, video_every: int = 0):
        self.phases = list(phases)
        self.steps, self.patch, self.tubelet = steps, patch_size, max(1, tubelet)
        self.divisor, self.video_every = divisor, video_every
        first = self.phases[0]
        self.budget = batch_size * self.tokens(first.img_size, 1, video=False)
        # the first phase keeps exactly the batch asked for (rounded to the divisor)
        self.first_batch = self._round(batch_size)

    def size(self, img_size: int) -> int:
        """The image size rounded down to a multiple of the patch size (at least one patch)."""
        return max(self.patch, img_size // self.patch * self.patch)

    def tokens(self, img_size: int, clip_len: int, *, video: bool) -> int:
        n = (self.size(img_size) // self.patch) ** 2
        if video:
            n *= max(1, clip_len // self.tubelet)
        return n + 1  # CLS

    def _round(self, b: int) -> int:
        return max(self.divisor, b // self.divisor * self.divisor)

    def phase_index(self, step: int) -> int:
        idx = 0
        for i, p in enumerate(self.phases):
            if step >= p.at * self.steps:
                idx = i
        return idx

    def is_video(self, step: int) -> bool:
        return self.video_every > 0 and step % self.video_every == self.video_every - 1

    def plan(self, step: int) -> StepPlan:
        i = self.phase_index(step)
        p = self.phases[i]
        video = self.is_video(step)
        clip_len = max(self.tubelet, p.clip_len // self.tubelet * self.tubelet) if video else 1
        tokens = self.tokens(p.img_size, clip_len, video=video)
        if i == 0 and not video:
            batch = self.first_batch
        else:
            batch = self._round(self.budget // tokens)
        return StepPlan(step, video, self.size(p.img_size), clip_len, batch, tokens, i)

    def samples_before(self, step: int, *, video: bool) -> int:
        """Global samples of one kind (image or video) consumed by steps [0, step)."""
        return sum(self.plan(s).batch_size for s in range(step) if self.is_video(s) == video)


def steps_for_epochs(epochs: float, n_samples: int, make_schedule) -> int:
    """The number of steps after which ``epochs`` passes over ``n_samples`` image samples are
    done, for a schedule that depends on the total (``make_schedule(steps)``): a fixed point."""
    steps = max(1, math.ceil(epochs * n_samples / make_schedule(1).first_batch))
    for _ in range(20):
        sched = make_schedule(steps)
        seen = sched.samples_before(steps, video=False)
        new = max(1, round(steps * epochs * n_samples / max(1, seen)))
        if new == steps:
            break
        steps = new
    return steps
