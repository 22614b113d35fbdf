"""``openclipart``: Debian's openclipart-svg, real public-domain clip art with titles and keywords.

The SVGs are rendered once with cairosvg at the requested resolution into a cache
(``<cache>/openclipart-<size>px-....npy`` + ``.json``, see :func:`packages.cache_dir`), in
parallel worker processes; later runs memory-map it. Title → caption, keywords → hashtags,
the top-level folder (animals, food, ...) → the class label. An SVG cairosvg cannot render
is left out and reported (``failed``). Rendering all 7,458 takes minutes on 2 cores (the
larger files dominate: ~1.7 s per MB); ``limit`` and ``max_bytes`` render a subset.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import multiprocessing
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .base import CaptionDataset, check_index, check_size, make_meta, normalize_tag
from .decode import to_tensor
from .packages import MissingPackage, cache_dir, openclipart_dir

_WORK = re.compile(rb"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(rb"<dc:title>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(rb"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(rb"<rdf:li>(.*?)</rdf:li>", re.S)
SPLITS = ("all", "train", "test")


def _text(b: bytes) -> str:
    return " ".join(html.unescape(b.decode("utf-8", "replace")).split())


def parse_metadata(svg: bytes, fallback_title: str) -> tuple[str, list[str]]:
    """(title, keywords) from an SVG's RDF metadata (the cc:Work's dc:title and dc:subject)."""
    work = _WORK.search(svg)
    block = work.group(0) if work else svg
    m = _TITLE.search(block)
    title = _text(m.group(1)) if m else ""
    keywords: list[str] = []
    s = _SUBJECT.search(block)
    if s:
        for li in _LI.findall(s.group(1)):
            for part in _text(li).split(","):
                tag = normalize_tag(part)
                if tag and tag not in keywords:
                    keywords.append(tag)
    return (title or fallback_title), keywords


def _render_one(args) -> tuple[str, np.ndarray | None, str, list[str], str]:
    """Worker: (path, size) -> (path, (size, size, 3) uint8 or None, title, keywords, error)."""
    path, size = args
    import cairosvg
    from PIL import Image

    stem = Path(path).stem.rstrip("_0123456789").replace("_", " ").strip()
    try:
        svg = Path(path).read_bytes()
        title, keywords = parse_metadata(svg, stem)
        # both sides given: the SVG's own preserveAspectRatio fits it in the square
        png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size,
                               unsafe=False)
        with Image.open(io.BytesIO(png)) as img:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return path, np.asarray(rgb, dtype=np.uint8), title, keywords, ""
    except Exception as e:  # noqa: BLE001 - any failure of a third-party renderer on one file
        return path, None, stem, [], f"{type(e).__name__}: {e}"[:200]


def _order_key(rel: str) -> str:
    # a fixed pseudo-random order (not alphabetical): a `limit` subset spans every category
    return hashlib.blake2b(rel.encode(), digest_size=8).hexdigest()


def svg_files(root: Path, max_bytes: int | None = None) -> list[Path]:
    """The package's SVG files (symlinked copies left out), in the fixed pseudo-random order."""
    files = [p for p in root.rglob("*.svg") if p.is_file() and not p.is_symlink()]
    if max_bytes is not None:
        files = [p for p in files if p.stat().st_size <= max_bytes]
    return sorted(files, key=lambda p: _order_key(p.relative_to(root).as_posix()))


def render_cache(size: int, *, limit: int | None = None, max_bytes: int | None = None,
                 cache: Path | None = None, workers: int | None = None,
                 verbose: bool = True) -> tuple[np.ndarray, dict]:
    """Render (or load from the cache) the clip art at ``size``: (images (N, size, size, 3)
    uint8, memory-mapped; index {"files", "titles", "keywords", "failed", ...})."""
    root = openclipart_dir()
    try:
        import cairosvg  # noqa: F401
    except ImportError:
        raise MissingPackage("openclipart", "cairosvg (PyPI)", "pip install cairosvg") from None
    cache = Path(cache) if cache is not None else cache_dir()
    name = f"openclipart-{size}px-{limit or 'all'}-{max_bytes or 'any'}"
    npy, idx_path = cache / f"{name}.npy", cache / f"{name}.json"
    if npy.is_file() and idx_path.is_file():
        with open(idx_path) as f:
            index = json.load(f)
        return np.load(npy, mmap_mode="r"), index
    files = svg_files(root, max_bytes)[:limit]
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 16))
    if verbose:  # the first run renders for a minute or more: say so before it starts
        print(f"openclipart: rendering {len(files)} SVGs at {size}px once into {cache} "
              f"(cached for later runs)", flush=True)
    t0 = time.perf_counter()
    jobs = [(str(p), size) for p in files]
    if workers > 1:
        # fork: the workers only run cairosvg/PIL (no torch threads), and unlike spawn it
        # works from any __main__ (stdin, notebooks)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            results = list(pool.imap(_render_one, jobs, chunksize=8))
    else:
        results = [_render_one(j) for j in jobs]
    ok = [r for r in results if r[1] is not None]
    failed = [(Path(r[0]).relative_to(root).as_posix(), r[4]) for r in results if r[1] is None]
    if not ok:
        raise RuntimeError(f"openclipart: none of {len(files)} SVGs rendered "
                           f"(first error: {failed[0][1] if failed else '?'})")
    images = np.stack([r[1] for r in ok])
    index = {"files": [Path(r[0]).relative_to(root).as_posix() for r in ok],
             "titles": [r[2] for r in ok], "keywords": [r[3] for r in ok],
             "failed": failed, "size": size, "seconds": round(time.perf_counter() - t0, 1),
             # every top-level folder, so the classes do not depend on the subset rendered
             "categories": sorted(d.name for d in root.iterdir() if d.is_dir())}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f".tmp-{os.getpid()}"
    np.save(str(npy) + tmp + ".npy", images)
    with open(str(idx_path) + tmp, "w") as f:
        json.dump(index, f)
    os.replace(str(npy) + tmp + ".npy", npy)  # atomic: a concurrent reader sees all or none
    os.replace(str(idx_path) + tmp, idx_path)
    if verbose:
        print(f"openclipart: rendered {len(ok)} SVGs at {size}px in {index['seconds']} s "
              f"({workers} workers) into {npy}; {len(failed)} could not be rendered")
    return np.load(npy, mmap_mode="r"), index


class OpenClipart(CaptionDataset):
    """Debian's openclipart-svg clip art, rendered at ``size`` (cached).

    Args:
        size: image side. split: "all", "train" or "test" (a fixed 10% of the files by hash).
        limit: render only the first ``limit`` files of a fixed pseudo-random order.
        max_bytes: leave out SVGs larger than this (the slowest to render).
        cache: the cache folder. workers: rendering processes (default: the cores).

    Items: ``image`` (3, size, size); caption = title, caption2 = "clip art of <title>",
    hashtags = keywords, label = the top-level category (``classes``). ``failed`` lists the
    SVGs cairosvg could not render. Raises :class:`MissingPackage` when openclipart-svg or
    cairosvg is missing.
    """

    kind = "image"
    prompts = ["clip art of {}.", "a drawing of {}.", "an illustration of {}.", "{}."]

    def __init__(self, size: int = 32, *, split: str = "all", limit: int | None = None,
                 max_bytes: int | None = None, cache=None, workers: int | None = None,
                 verbose: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit: expected None or an int >= 1, got {limit!r}")
        self.size = check_size(size)
        self.images, index = render_cache(self.size, limit=limit, max_bytes=max_bytes,
                                          cache=cache, workers=workers, verbose=verbose)
        self.failed = [tuple(f) for f in index["failed"]]
        if self.failed and verbose:
            warnings.warn(f"openclipart: {len(self.failed)} SVGs could not be rendered and are "
                          f"left out (first: {self.failed[0][0]}: {self.failed[0][1]})",
                          stacklevel=2)
        files = index["files"]
        cats = index.get("categories") or sorted({f.split("/")[0] for f in files})
        self.classes = [c.replace("_", " ") for c in cats]
        rows = range(len(files))
        if split != "all":
            test = [int(_order_key("split:" + f), 16) % 10 == 0 for f in files]
            rows = [r for r in rows if test[r] == (split == "test")]
        self.rows = list(rows)
        self.files = [files[r] for r in self.rows]
        self.titles = [index["titles"][r] for r in self.rows]
        self.keywords = [index["keywords"][r] for r in self.rows]
        self.labels = [cats.index(f.split("/")[0]) for f in self.files]

    def __len__(self) -> int:
        return len(self.rows)

    def meta(self, i: int) -> dict:
        i = check_index(i, len(self))
        title = self.titles[i]
        return make_meta(i, title, f"clip art of {title}", self.keywords[i], self.labels[i])

    def pixels(self, i: int) -> torch.Tensor:
        return to_tensor(np.array(self.images[self.rows[check_index(i, len(self))]]))

    def content_hash(self, i: int) -> str:
        # the rendered pixels are the content (byte-different SVGs can draw the same picture)
        row = np.ascontiguousarray(self.images[self.rows[check_index(i, len(self))]])
        return hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()
