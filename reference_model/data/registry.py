"""``build_dataset(name, ...)``: every dataset by name, with the fallback to synthetic data."""

from __future__ import annotations

import warnings

from .packages import MissingPackage

NAMES = ("synthetic", "synthetic-video", "openclipart", "fashion-mnist", "folder:PATH",
         "webdataset:SHARDS", "video-folder:PATH")

# what "realistic web data" means for the synthetic training split (curation has work to do)
WEB_LIKE = {"duplicate_rate": 0.02, "tag_noise": 0.15, "spam_rate": 0.01, "untagged_rate": 0.05}


def build_dataset(name: str, *, split: str = "train", size: int = 32, frames: int = 8,
                  n: int | None = None, seed: int = 0, fallback: bool = True,
                  web_like: bool | None = None, **kwargs):
    """A dataset by name (README "Samples and batches").

    name: "synthetic" (images), "synthetic-video" (clips), "openclipart", "fashion-mnist",
        "folder:PATH" (images + captions.csv/jsonl), "webdataset:SHARDS" (tar shards, brace
        patterns), "video-folder:PATH".
    split: "train" | "val" | "test" (synthetic, fashion-mnist; openclipart also "all").
    size: image side; frames: clip length (video datasets); n: number of items (synthetic:
        default 10000 images / 2000 clips; others: all).
    fallback: when a package is missing, warn (naming the package and how to install it) and
        return synthetic data of the same kind; False raises :class:`MissingPackage`.
    web_like: the synthetic data gets web-data imperfections (duplicates, noisy, spam and
        missing tags: ``WEB_LIKE``) for the curation steps; default: on for "train".
    kwargs: passed to the dataset class.
    """
    from . import fashion_mnist, folder, openclipart, synthetic, webdataset_shards

    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    kind, _, arg = name.partition(":")
    if kind in ("synthetic", "synthetic-video"):
        imperfect = dict(WEB_LIKE) if (split == "train" if web_like is None else web_like) \
            else {}
        imperfect.update(kwargs)
        if kind == "synthetic":
            return synthetic.SyntheticImages(n or 10000, size, seed=seed, split=split,
                                             **imperfect)
        return synthetic.SyntheticClips(n or 2000, size, frames, seed=seed, split=split,
                                        **imperfect)
    try:
        if kind == "openclipart":
            ds = openclipart.OpenClipart(size, split=split if split != "val" else "test",
                                         limit=n, **kwargs)
        elif kind == "fashion-mnist":
            ds = fashion_mnist.FashionMNIST(size, split="test" if split != "train" else "train",
                                            n=n, **kwargs)
        elif kind == "folder" and arg:
            ds = folder.ImageFolderCaptions(arg, size, **kwargs)
        elif kind == "webdataset" and arg:
            ds = webdataset_shards.WebDatasetShards(arg, size, **kwargs)
        elif kind == "video-folder" and arg:
            ds = folder.VideoFolder(arg, size, frames, **kwargs)
        else:
            raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    except MissingPackage as e:
        if not fallback:
            raise
        warnings.warn(f"{e}. Falling back to synthetic data.", stacklevel=2)
        return build_dataset("synthetic", split=split, size=size, n=n, seed=seed,
                             web_like=web_like)
    return ds
