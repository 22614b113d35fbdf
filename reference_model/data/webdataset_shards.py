"""User data: webdataset tar shards, read with random access.

A sample is the group of tar members sharing a key (webdataset's convention: the path up to
the first dot of the file name): an image (``jpg``, ``jpeg``, ``png``, ``webp``, ...), a
caption (``txt`` or ``caption``), optionally ``json`` (``caption``, ``caption2``,
``hashtags``/``tags``, ``label``), ``tags`` (text) and ``cls`` (an int label).

Why not webdataset's iterable pipeline: the loader needs random access (seeded permutations
and hashtag-balanced draws, sharded by rank and worker, resumed exactly at a batch). So each
shard is indexed once — member offsets, with the small text members read at that time — and
images are read by seeking into the tar. Shards must be uncompressed tars (as webdataset
writes them); a shard that cannot be read is skipped, counted and reported.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import warnings
from pathlib import Path

import torch

from .base import (DECODE_ERRORS, CaptionDataset, UnreadableSample, check_index, check_size,
                   make_meta, parse_tags)
from .decode import load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def expand_shards(spec) -> list[Path]:
    """'dir/shard-{000..009}.tar' (brace expansion), a folder (its *.tar), or a list."""
    from braceexpand import braceexpand  # ships with webdataset

    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for s in spec for p in braceexpand(str(s))]
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(p) for p in braceexpand(str(spec))]
    if not paths:
        raise ValueError(f"shards: no tar shards match {spec!r}")
    for p in paths:
        if p.suffix != ".tar":
            raise ValueError(f"shards: expected uncompressed .tar shards (random access), got "
                             f"{p}; decompress it first")
    return paths


class WebDatasetShards(CaptionDataset):
    """Samples of webdataset tar shards (see the module doc), images decoded at ``size``.

    ``unreadable_shards``: [(path, reason)] of shards that could not be indexed (also warned).
    """

    kind = "image"

    def __init__(self, shards, size: int = 32):
        from webdataset.tariterators import base_plus_ext

        self.size = check_size(size)
        self.paths = expand_shards(shards)
        self.samples: list[dict] = []
        self.unreadable_shards: list[tuple[str, str]] = []
        names: set[str] = set()
        for s, path in enumerate(self.paths):
            groups: dict[str, dict] = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = base_plus_ext(m.name)
                        if key is None:
                            continue
                        g = groups.setdefault(key, {"key": key, "shard": s})
                        ext = ext.lower()
                        if ext in IMAGE_KEYS:
                            g["image"] = (m.offset_data, m.size)
                        elif ext in ("txt", "caption", "json", "tags", "cls"):
                            g[ext] = tar.extractfile(m).read().decode("utf-8", "replace")
            except (OSError, tarfile.TarError, EOFError) as e:
                self.unreadable_shards.append((str(path), f"{type(e).__name__}: {e}"))
                warnings.warn(f"webdataset: skipped unreadable shard {path} "
                              f"({type(e).__name__}: {e}); its readable samples are kept",
                              stacklevel=2)
            for g in groups.values():
                if "image" in g:
                    self.samples.append(self._parse(g))
                    if isinstance(self.samples[-1]["label"], str):
                        names.add(self.samples[-1]["label"])
        if not self.samples:
            raise ValueError(f"shards: no samples with an image in {len(self.paths)} shard(s) "
                             f"({self.paths[0]} ...)")
        self.classes = sorted(names)
        for smp in self.samples:
            if isinstance(smp["label"], str):
                smp["label"] = self.classes.index(smp["label"])
        self.prompts = ["a photo of a {}.", "a picture of a {}.", "a {}."]

    @staticmethod
    def _parse(g: dict) -> dict:
        meta = {}
        if "json" in g:
            try:
                meta = json.loads(g["json"])
            except json.JSONDecodeError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
        caption = g.get("txt") or g.get("caption") or meta.get("caption") or g["key"]
        tags = parse_tags(g.get("tags") or meta.get("hashtags") or meta.get("tags"))
        label = meta.get("label", g.get("cls", -1))
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        return {"shard": g["shard"], "image": g["image"], "key": g["key"],
                "caption": str(caption).strip(), "caption2": meta.get("caption2"),
                "hashtags": tags, "label": label if label not in (None, "") else -1}

    def __len__(self) -> int:
        return len(self.samples)

    def meta(self, i: int) -> dict:
        i = check_index(i, len(self))
        s = self.samples[i]
        return make_meta(i, s["caption"], s["caption2"], s["hashtags"], s["label"])

    def _bytes(self, i: int) -> bytes:
        s = self.samples[check_index(i, len(self))]
        path = self.paths[s["shard"]]
        offset, size = s["image"]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:
                raise EOFError(f"expected {size} bytes at offset {offset}, read {len(data)}")
            return data
        except (OSError, EOFError) as e:
            raise UnreadableSample(i, f"{path}:{s['key']}", e) from None

    def pixels(self, i: int) -> torch.Tensor:
        data = self._bytes(i)
        try:
            return load_image(data, self.size)
        except DECODE_ERRORS as e:
            s = self.samples[i]
            raise UnreadableSample(i, f"{self.paths[s['shard']]}:{s['key']}", e) from None

    def content_hash(self, i: int) -> str:
        return hashlib.blake2b(self._bytes(i), digest_size=16).hexdigest()
