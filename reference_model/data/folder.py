"""User data: an image folder with captions, and a folder of video clips.

Captions come from ``captions.jsonl`` or ``captions.csv`` in the folder (or a file given):
one record per sample with ``path`` (relative to the folder), ``caption`` and optionally
``caption2``, ``hashtags`` (a list, or a string of tags separated by spaces or commas, ``#``
optional) and ``label`` (a class name or index). Without a captions file every image (clip)
under the folder is a sample; its class is its sub-folder's name (ImageFolder style) and its
caption "a photo of a <class>" (or the file name when the folder is flat).
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from pathlib import Path

import torch

from .base import (DECODE_ERRORS, CaptionDataset, UnreadableSample, check_index, check_size,
                   make_meta, parse_tags)
from .decode import (IMAGE_EXTS, VIDEO_EXTS, has_video_decoder, load_frame_folder, load_image,
                     load_video_file)

CAPTION_FILES = ("captions.jsonl", "captions.csv")


def read_captions(path: Path) -> list[dict]:
    """Records of a captions CSV (header with ``path`` and ``caption``) or JSONL file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"captions: expected a .csv or .jsonl file, got {path}")
    for n, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("path") or r.get("caption") is None:
            raise ValueError(f"{path}: record {n} needs 'path' and 'caption' fields, got {r!r}")
    return rows


def _find_captions(root: Path, captions) -> Path | None:
    if captions is not None:
        p = Path(captions)
        p = p if p.is_absolute() or p.exists() else root / p
        if not p.is_file():
            raise FileNotFoundError(f"captions: no such file {p}")
        return p
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return root / name
    return None


def _records(root: Path, captions, is_sample) -> tuple[list[dict], list[str]]:
    """(records with path, caption, caption2, hashtags, label), classes."""
    cap = _find_captions(root, captions)
    if cap is not None:
        rows = read_captions(cap)
        labels = [r.get("label") for r in rows]
        names = sorted({str(v) for v in labels
                        if v not in (None, "") and not str(v).lstrip("-").isdigit()})
        recs = []
        for r in rows:
            v = r.get("label")
            if v in (None, ""):
                label = -1
            elif str(v).lstrip("-").isdigit():
                label = int(v)
            else:
                label = names.index(str(v))
            recs.append({"path": r["path"], "caption": str(r["caption"]),
                         "caption2": r.get("caption2") or None,
                         "hashtags": parse_tags(r.get("hashtags") or r.get("tags")),
                         "label": label})
        return recs, names
    paths = sorted(p for p in root.rglob("*") if is_sample(p))
    classes = sorted({p.parent.relative_to(root).parts[0] for p in paths
                      if p.parent != root})
    recs = []
    for p in paths:
        rel = p.relative_to(root)
        if classes and len(rel.parts) > 1:
            cls = rel.parts[0]
            caption, label = f"a photo of a {cls.replace('_', ' ')}", classes.index(cls)
        else:
            caption, label = p.stem.replace("_", " ").replace("-", " "), -1
        recs.append({"path": rel.as_posix(), "caption": caption, "caption2": None,
                     "hashtags": [], "label": label})
    return recs, [c.replace("_", " ") for c in classes]


class _FileDataset(CaptionDataset):
    def __init__(self, root, size: int, captions, is_sample):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: no such folder {self.root}")
        self.size = check_size(size)
        self.records, self.classes = _records(self.root, captions, is_sample)
        if not self.records:
            raise ValueError(f"root: no samples found in {self.root} (expected files of "
                             f"{self._exts} or a captions.csv / captions.jsonl)")
        self.prompts = ["a photo of a {}.", "a picture of a {}.", "a {}."]

    def __len__(self) -> int:
        return len(self.records)

    def meta(self, i: int) -> dict:
        i = check_index(i, len(self))
        r = self.records[i]
        return make_meta(i, r["caption"], r["caption2"], r["hashtags"], r["label"])

    def path(self, i: int) -> Path:
        return self.root / self.records[check_index(i, len(self))]["path"]

    def _read(self, i: int, fn):
        p = self.path(i)
        try:
            return fn(p)
        except DECODE_ERRORS as e:
            raise UnreadableSample(i, str(p), e) from None

    def content_hash(self, i: int) -> str:
        p = self.path(i)

        def digest(path: Path) -> str:
            h = hashlib.blake2b(digest_size=16)
            files = sorted(path.iterdir()) if path.is_dir() else [path]
            for f in files:
                h.update(f.read_bytes())
            return h.hexdigest()

        return self._read(i, lambda _: digest(p))


class ImageFolderCaptions(_FileDataset):
    """Images under ``root`` with a captions CSV / JSONL (see the module doc).

    Items: ``image`` (3, size, size), the shorter side scaled to ``size``, centre-cropped. A
    corrupt or missing image raises UnreadableSample (the loader skips and counts it).
    """

    kind = "image"
    _exts = IMAGE_EXTS

    def __init__(self, root, size: int = 32, captions=None):
        super().__init__(root, size, captions,
                         lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTS)

    def pixels(self, i: int) -> torch.Tensor:
        return self._read(i, lambda p: load_image(p, self.size))


class VideoFolder(_FileDataset):
    """Clips under ``root``: each a folder of frame images (sorted by name) or a video file
    (.mp4, .avi, .mov, .mkv, .webm; decoded by PyAV when installed). ``frames`` frames are
    taken evenly over each clip. Captions as for :class:`ImageFolderCaptions`, ``path``
    naming the clip's folder or file."""

    kind = "video"
    _exts = VIDEO_EXTS + ("frame folders",)

    def __init__(self, root, size: int = 32, frames: int = 8, captions=None):
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames: expected an int >= 1, got {frames!r}")
        self.frames = frames

        def is_clip(p: Path) -> bool:
            if p.is_file():
                return p.suffix.lower() in VIDEO_EXTS
            return p.is_dir() and any(c.suffix.lower() in IMAGE_EXTS for c in p.iterdir())

        super().__init__(root, size, captions, is_clip)
        files = [r for r in self.records if Path(r["path"]).suffix.lower() in VIDEO_EXTS]
        if files and not has_video_decoder():
            warnings.warn(f"video-folder: {len(files)} video files in {self.root} need PyAV to "
                          f"decode (pip install av); they will be skipped as unreadable",
                          stacklevel=2)

    def pixels(self, i: int) -> torch.Tensor:
        def load(p: Path):
            if p.is_dir():
                return load_frame_folder(p, self.size, self.frames)
            return load_video_file(p, self.size, self.frames)

        return self._read(i, load)
