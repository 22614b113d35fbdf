"""The dataset interface every reference_model dataset follows (README "Samples and batches").

An item is a dict: ``image`` (3, H, W) or ``video`` (3, T, H, W) float32 in [0, 1], ``caption``,
``caption2``, ``hashtags`` (list of lowercase tags without ``#``), ``label`` (int, -1 for none)
and ``index``. ``meta(i)`` is the same item without its pixels: curation and the hashtag
vocabulary read only that, so they never decode an image.
"""

from __future__ import annotations

import hashlib
import re

import torch

# what reading or decoding one file can raise (PIL, cairosvg/expat, gzip/zlib, tarfile, json,
# PyAV, or a decoder that is not installed): a dataset turns these into UnreadableSample,
# naming the file
DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, RuntimeError, MemoryError,
                 ImportError)


class UnreadableSample(Exception):
    """Item ``index`` cannot be read (a corrupt or missing file): the loader skips it, counts
    it and reports ``reason``; it is never fatal. Only file reading raises it, so a bug in the
    code around it stays loud."""

    def __init__(self, index: int, source: str, error: BaseException | str):
        self.index, self.source = int(index), str(source)
        self.reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"item {index} ({source}): {self.reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (UnreadableSample, (self.index, self.source, self.reason))

_TAG_SPLIT = re.compile(r"[\s,;]+")


def normalize_tag(tag: str) -> str:
    """'#Red ' -> 'red'; inner spaces become '_' (a hashtag is one token)."""
    return "_".join(str(tag).strip().lstrip("#").lower().split())


def parse_tags(value) -> list[str]:
    """Hashtags from a list, or a string separated by spaces / commas / semicolons, each
    normalised, duplicates dropped (first kept)."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = _TAG_SPLIT.split(value)
    else:
        parts = list(value)
    out: list[str] = []
    for p in parts:
        t = normalize_tag(p)
        if t and t not in out:
            out.append(t)
    return out


def check_index(i, n: int, name: str = "index") -> int:
    """Python-style index into a dataset of ``n`` items (negatives count from the end)."""
    if isinstance(i, torch.Tensor) and i.numel() == 1:
        i = int(i)
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{name}: expected an int, got {type(i).__name__} ({i!r})")
    if i < -n or i >= n:
        raise IndexError(f"{name}: expected an int in [{-n}, {n - 1}], got {i}")
    return i % n


def check_size(size, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name}: expected an int (pixels), got {type(size).__name__} ({size!r})")
    if size < 4:
        raise ValueError(f"{name}: expected an image side of at least 4 pixels, got {size}")
    return size


class CaptionDataset(torch.utils.data.Dataset):
    """Base of the image/video + caption + hashtag datasets (map-style, random access).

    Subclasses set ``kind`` ("image" | "video"), ``size``, ``frames`` (video), ``classes``,
    ``prompts`` and implement ``__len__``, ``meta(i)`` and ``pixels(i)``.
    """

    kind: str = "image"
    size: int = 32
    frames: int = 1
    classes: list[str] = []
    prompts: list[str] = ["a {}.", "a photo of a {}."]

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta(self, i: int) -> dict:
        """Item i without its pixels: caption, caption2, hashtags, label, index."""
        raise NotImplementedError

    def pixels(self, i: int) -> torch.Tensor:
        """Item i's (3, H, W) image or (3, T, H, W) clip, float32 in [0, 1]."""
        raise NotImplementedError

    def __getitem__(self, i) -> dict:
        i = check_index(i, len(self))
        item = self.meta(i)
        item[self.kind] = self.pixels(i)
        return item

    def content_hash(self, i: int) -> str:
        """A hash of item i's content (duplicate removal). Default: its decoded pixels
        quantised to 8 bits; file-backed datasets hash the file's bytes instead."""
        px = (self.pixels(check_index(i, len(self))) * 255).round().to(torch.uint8)
        return hashlib.blake2b(px.numpy().tobytes(), digest_size=16).hexdigest()

    def hashtag_lists(self) -> list[list[str]]:
        """Every item's hashtags (from meta: no decoding)."""
        return [self.meta(i)["hashtags"] for i in range(len(self))]


def make_meta(index: int, caption: str, caption2: str | None = None, hashtags=None,
              label: int = -1) -> dict:
    """An item dict without pixels, with the README's defaults filled in."""
    return {"caption": caption, "caption2": caption2 or caption, "hashtags": parse_tags(hashtags),
            "label": int(label), "index": int(index)}
