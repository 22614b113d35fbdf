"""The held-out evaluation data, materialised once as tensors.

Synthetic test split (its scenes never appear in training: the split is part of every item's
seed): images for zero-shot classification (the single-object scenes, 36 colour-shape
classes, also scored as 6 shapes and 6 colours), image↔text retrieval and hashtags (all
scenes), the relation test (two-object scenes: true caption vs the relation inverted); clips for zero-shot motion classification and a linear probe (fitted on the "val"
split's clips). Fashion-MNIST's test split when the Debian package is installed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from ..data import FashionMNIST, MissingPackage, SyntheticClips, SyntheticImages
from ..data.shapes import COLOURS, SHAPES


@dataclasses.dataclass
class EvalData:
    images: torch.Tensor  # (N, 3, H, W)
    captions: list[str]
    hashtags: list[list[str]]
    labels: torch.Tensor  # (N,) colour-shape class, -1 for two-object scenes
    classes: list[str]
    prompts: list[str]
    clips: torch.Tensor  # (M, 3, T, H, W)
    clip_labels: torch.Tensor
    motion_classes: list[str]
    motion_prompts: list[str]
    probe_clips: torch.Tensor  # (M', 3, T, H, W): the probe's training clips
    probe_labels: torch.Tensor
    # per image: its caption with the relation inverted (None for one object)
    swapped: list = dataclasses.field(default_factory=list)
    fmnist_images: Optional[torch.Tensor] = None
    fmnist_labels: Optional[torch.Tensor] = None
    fmnist_classes: Optional[list[str]] = None
    fmnist_prompts: Optional[list[str]] = None
    fmnist_reason: str = ""
    shape_classes: tuple = SHAPES
    colour_classes: tuple = tuple(COLOURS)

    @property
    def single(self) -> torch.Tensor:
        """Mask of the single-object (labelled) images."""
        return self.labels >= 0


def _stack(ds, key: str, n: int):
    items = [ds[i] for i in range(n)]
    return (torch.stack([it[key] for it in items]), [it["caption"] for it in items],
            [it["hashtags"] for it in items], torch.tensor([it["label"] for it in items]))


def build_eval_data(size: int = 32, frames: int = 8, *, n_images: int = 400,
                    n_clips: int = 140, n_fmnist: int = 300, seed: int = 1234,
                    fashion_mnist: bool = True) -> EvalData:
    """Render the evaluation sets (clean data: no duplicates, no noisy tags)."""
    imgs = SyntheticImages(n_images, size, seed=seed, split="test")
    images, captions, hashtags, labels = _stack(imgs, "image", n_images)
    clips_ds = SyntheticClips(n_clips, size, frames, seed=seed, split="test")
    clips, _, _, clip_labels = _stack(clips_ds, "video", n_clips)
    probe_ds = SyntheticClips(n_clips, size, frames, seed=seed, split="val")
    probe_clips, _, _, probe_labels = _stack(probe_ds, "video", n_clips)
    data = EvalData(images, captions, hashtags, labels, list(imgs.classes), list(imgs.prompts),
                    clips, clip_labels, list(clips_ds.classes), list(clips_ds.prompts),
                    probe_clips, probe_labels, [imgs.swapped_caption(i) for i in range(n_images)])
    if fashion_mnist and n_fmnist > 0:
        try:
            fm = FashionMNIST(size, split="test", n=n_fmnist)
            data.fmnist_images = torch.stack([fm.pixels(i) for i in range(len(fm))])
            data.fmnist_labels = torch.as_tensor(fm.labels[:len(fm)])
            data.fmnist_classes, data.fmnist_prompts = list(fm.classes), list(fm.prompts)
        except MissingPackage as e:
            data.fmnist_reason = str(e)
        except (OSError, ValueError, EOFError) as e:  # a corrupt archive: skip, say why
            data.fmnist_reason = f"fashion-mnist unreadable: {type(e).__name__}: {e}"
            warnings.warn(f"evaluate: {data.fmnist_reason}; Fashion-MNIST skipped",
                          stacklevel=2)
    elif not fashion_mnist:
        data.fmnist_reason = "fashion_mnist=False"
    return data
