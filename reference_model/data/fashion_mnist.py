"""``fashion-mnist``: Debian's dataset-fashion-mnist (idx-ubyte.gz) for zero-shot classification."""

from __future__ import annotations

import gzip

import numpy as np
import torch

from .base import CaptionDataset, check_index, check_size, make_meta
from .packages import fashion_mnist_dir

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot"]


def read_idx(path) -> np.ndarray:
    """An idx-ubyte(.gz) file -> uint8 array (images (N, 28, 28) or labels (N,))."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {arr.size}")
    return arr.reshape(dims)


class FashionMNIST(CaptionDataset):
    """Fashion-MNIST (split "train": 60k, "test": 10k), grey 28×28 → RGB ``size`` × ``size``.

    ``n`` takes the first n items. Items: ``image`` (3, size, size) (dark garment on a white
    background, inverted from the original so it looks like a product photo), caption
    "a photo of a <class>", hashtags [<class>], label in ``classes``. Raises MissingPackage
    without the Debian package.
    """

    kind = "image"
    classes = CLASSES
    prompts = ["a photo of a {}.", "a picture of a {}.", "a {}.", "a photo of the {}, a type "
               "of clothing.", "a black and white photo of a {}."]

    def __init__(self, size: int = 32, *, split: str = "test", n: int | None = None,
                 invert: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        root = fashion_mnist_dir()
        prefix = "t10k" if split == "test" else "train"
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        if n is not None:
            images, labels = images[:n], labels[:n]
        self.size = check_size(size)
        self.images, self.labels = images, labels.astype(np.int64)
        self.invert = bool(invert)

    def __len__(self) -> int:
        return len(self.labels)

    def meta(self, i: int) -> dict:
        i = check_index(i, len(self))
        c = CLASSES[int(self.labels[i])]
        return make_meta(i, f"a photo of a {c}", f"a picture of a {c}", [c], int(self.labels[i]))

    def pixels(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.images[check_index(i, len(self))].astype(np.float32) / 255)
        if self.invert:
            x = 1.0 - x
        if self.size != 28:
            x = torch.nn.functional.interpolate(x[None, None], size=(self.size, self.size),
                                                mode="bilinear", align_corners=False,
                                                antialias=self.size < 28)[0, 0]
        return x.clamp(0, 1).expand(3, -1, -1).contiguous()
