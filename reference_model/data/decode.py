"""Decoding files into the items' tensors: images (PIL), frame folders and video files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def _fit(img, size: int):
    """PIL image -> RGB, transparency composited on white, scaled so the shorter side is
    ``size`` and centre-cropped to size × size."""
    from PIL import Image, ImageOps

    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert("RGB")
    return ImageOps.fit(img, (size, size), method=Image.BILINEAR)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    # a copy: PIL's arrays are read-only, torch wants to own writable memory
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def load_image(source, size: int) -> torch.Tensor:
    """An image file (path) or its bytes -> (3, size, size) float32 in [0, 1]. Raises what PIL
    raises on a corrupt or truncated file (the caller turns it into UnreadableSample)."""
    from PIL import Image

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(f) as img:
        img.load()  # decode now: a truncated file fails here, not later
        return to_tensor(np.asarray(_fit(img, size)))


def frame_indices(total: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over a clip of ``total`` frames (repeats if short)."""
    if total < 1:
        raise ValueError("clip: it has no frames")
    return np.linspace(0, total - 1, frames).round().astype(int).tolist()


def load_frame_folder(folder: Path, size: int, frames: int) -> torch.Tensor:
    """A folder of frame images (sorted by name) -> (3, frames, size, size)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    idx = frame_indices(len(files), frames)
    return torch.stack([load_image(files[i], size) for i in idx], dim=1)


def has_video_decoder() -> bool:
    """Whether PyAV (``av``, what torchvision's video reader also decodes with) is installed."""
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def load_video_file(path: Path, size: int, frames: int) -> torch.Tensor:
    """A video file -> (3, frames, size, size) through PyAV. Raises ImportError naming the
    package when no decoder is installed."""
    if not has_video_decoder():
        raise ImportError(f"decoding {Path(path).suffix} files needs PyAV: pip install av")
    import av
    from PIL import Image

    with av.open(os.fspath(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    idx = frame_indices(len(decoded), frames)
    return torch.stack([to_tensor(np.asarray(_fit(Image.fromarray(decoded[i]), size)))
                        for i in idx], dim=1)
