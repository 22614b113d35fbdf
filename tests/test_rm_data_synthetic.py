"""The synthetic data: deterministic by seed, captions true to the pixels, clips that move."""

import numpy as np
import pytest
import torch

from reference_model.data import (IMAGE_CLASSES, MOTIONS, SyntheticClips, SyntheticImages,
                                  build_dataset)
from reference_model.data.shapes import COLOURS, SHAPES

RGB = {k: torch.tensor(v) for k, v in COLOURS.items()}


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("cls,kw", [(SyntheticImages, {}), (SyntheticClips, {"frames": 4})])
def test_deterministic_by_seed(cls, kw):
    a = cls(40, 16, seed=3, tag_noise=0.3, duplicate_rate=0.2, untagged_rate=0.1, **kw)
    b = cls(40, 16, seed=3, tag_noise=0.3, duplicate_rate=0.2, untagged_rate=0.1, **kw)
    for i in (0, 7, 39, 5, 0):  # any order: an item depends on (seed, split, index) only
        _same(a[i], b[i])
    c = cls(40, 16, seed=4, **kw)
    assert any(a[i]["caption"] != c[i]["caption"] for i in range(10))
    key = "image" if cls is SyntheticImages else "video"
    assert not torch.equal(a[1][key], c[1][key])


def test_splits_and_sizes_differ_only_where_they_should():
    train = SyntheticImages(50, 16, seed=0, split="train")
    test = SyntheticImages(50, 16, seed=0, split="test")
    assert {train.meta(i)["caption"] for i in range(50)} != \
        {test.meta(i)["caption"] for i in range(50)}
    assert not torch.equal(train[0]["image"], test[0]["image"])
    # the same scene at another resolution: same caption, same colours where the shapes are
    big = SyntheticImages(50, 48, seed=0, split="train")
    assert [big.meta(i) for i in range(50)] == [train.meta(i) for i in range(50)]
    assert big[3]["image"].shape == (3, 48, 48) and train[3]["image"].shape == (3, 16, 16)
    small_of_big = torch.nn.functional.avg_pool2d(big[3]["image"][None], 3)[0]
    assert (small_of_big - train[3]["image"]).abs().mean() < 0.06


def test_item_format():
    ds = SyntheticImages(30, 20, seed=1)
    for i in range(30):
        it = ds[i]
        assert set(it) == {"image", "caption", "caption2", "hashtags", "label", "index"}
        assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 20, 20)
        assert 0 <= float(it["image"].min()) and float(it["image"].max()) <= 1
        assert it["index"] == i and it["caption"] and it["caption2"]
        assert all(t == t.lower() and not t.startswith("#") for t in it["hashtags"])
        if it["label"] >= 0:
            colour, shape = IMAGE_CLASSES[it["label"]].split()
            assert it["caption"].endswith(f"{colour} {shape}") and " of " not in it["caption"]
            assert {colour, shape} <= set(it["hashtags"])
        else:
            assert any(r in it["caption"] for r in ("left of", "right of", "above", "below"))
    clips = SyntheticClips(10, 16, frames=6, seed=1)
    it = clips[2]
    assert it["video"].shape == (3, 6, 16, 16) and MOTIONS[it["label"]] in it["caption"]
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(ValueError, match="split"):
        SyntheticImages(3, 16, split="nope")
    with pytest.raises(ValueError, match="size"):
        SyntheticImages(3, 2)


def _colour_centroid(img: torch.Tensor, colour: str):
    """Centroid (x, y) in [0, 1] of the pixels within a small distance of a named colour."""
    d = (img - RGB[colour][:, None, None]).norm(dim=0)
    mask = d < 0.25
    if mask.sum() < 3:
        return None
    ys, xs = mask.nonzero(as_tuple=True)
    n = img.shape[-1]
    return (xs.float().mean() + 0.5) / n, (ys.float().mean() + 0.5) / n


def test_captions_describe_the_pixels():
    """Colour and relation of the caption hold in the rendered image (two different
    colours: each colour's pixel centroid is on the side the caption says)."""
    ds = SyntheticImages(150, 48, seed=5, split="test", noise=0.0)
    checked = 0
    for i in range(150):
        sc = ds.scene(i)
        if sc["relation"] is None or sc["objects"][0]["colour"] == sc["objects"][1]["colour"]:
            continue
        img = ds[i]["image"]
        a = _colour_centroid(img, sc["objects"][0]["colour"])
        b = _colour_centroid(img, sc["objects"][1]["colour"])
        assert a is not None and b is not None, ds.meta(i)["caption"]
        rel = sc["relation"]
        if rel == "left of":
            assert a[0] < b[0]
        elif rel == "right of":
            assert a[0] > b[0]
        elif rel == "above":
            assert a[1] < b[1]
        else:
            assert a[1] > b[1]
        checked += 1
    assert checked > 40


def test_clip_motion_is_in_the_pixels():
    ds = SyntheticClips(80, 32, frames=6, seed=2, noise=0.0, colours=tuple(COLOURS),
                        shapes=SHAPES)
    seen = set()
    for i in range(80):
        it, sc = ds[i], ds.scene(i)
        m, colour = MOTIONS[it["label"]], sc["object"]["colour"]
        first = _colour_centroid(it["video"][:, 0], colour)
        last = _colour_centroid(it["video"][:, -1], colour)
        area = [(it["video"][:, t] - RGB[colour][:, None, None]).norm(dim=0).lt(0.25).sum()
                for t in (0, -1)]
        if m == "moving left":
            assert last[0] < first[0] - 0.2
        elif m == "moving right":
            assert last[0] > first[0] + 0.2
        elif m == "moving up":
            assert last[1] < first[1] - 0.2
        elif m == "moving down":
            assert last[1] > first[1] + 0.2
        elif m == "growing":
            assert area[1] > 2 * area[0]
        elif m == "shrinking":
            assert area[0] > 2 * area[1]
        else:  # rotating: the object stays, its pixels change
            assert sc["object"]["shape"] not in ("circle", "ring")
            assert abs(last[0] - first[0]) < 0.05 and abs(last[1] - first[1]) < 0.05
            assert not torch.equal(it["video"][:, 0], it["video"][:, -1])
        seen.add(m)
    assert seen == set(MOTIONS)


def test_swapped_caption_and_clip_palette():
    ds = SyntheticImages(40, 8, seed=0)
    for i in range(40):
        cap, sw = ds.meta(i)["caption"], ds.swapped_caption(i)
        if ds.meta(i)["label"] >= 0:
            assert sw is None
            continue
        rel = ds.scene(i)["relation"]
        inv = {"left of": "right of", "right of": "left of", "above": "below",
               "below": "above"}[rel]
        assert sw == cap.replace(f" {rel} ", f" {inv} ") and sw != cap
    clips = SyntheticClips(200, 8, frames=2, seed=0)
    looks = {(clips.scene(i)["object"]["colour"], clips.scene(i)["object"]["shape"])
             for i in range(200)}
    assert looks == {(c, s) for c in ("red", "green", "blue") for s in ("square", "triangle")}
    assert "a red square {}" in clips.prompts
    wide = SyntheticClips(300, 8, frames=2, seed=0, colours=tuple(COLOURS), shapes=SHAPES)
    shapes_seen = {wide.scene(i)["object"]["shape"] for i in range(300)}
    assert shapes_seen == set(SHAPES)
    still = SyntheticClips(100, 8, frames=2, seed=0, shapes=("circle",))  # nothing to rotate
    assert "rotating" not in {MOTIONS[still.meta(i)["label"]] for i in range(100)}
    with pytest.raises(ValueError, match="subsets"):
        SyntheticClips(5, 8, colours=("pink",))


def test_web_like_imperfections_and_content_hash():
    ds = build_dataset("synthetic", split="train", size=16, n=400, seed=0)  # web-like
    metas = [ds.meta(i) for i in range(400)]
    assert any(not m["hashtags"] for m in metas)  # untagged
    assert any(any(t.startswith("tag") for t in m["hashtags"]) for m in metas)  # noise tags
    assert any(len(m["hashtags"]) > 12 for m in metas)  # spam
    dups = [i for i in range(400) if ds.source(i) != i]
    assert dups
    for i in dups[:5]:
        j = ds.source(i)
        assert torch.equal(ds[i]["image"], ds[j]["image"])
        assert ds.content_hash(i) == ds.content_hash(j)
    # the scene hash finds exactly the duplicates a pixel hash finds
    pixel_hash = super(type(ds), ds).content_hash
    for i in list(range(60)) + dups[:5]:
        for j in list(range(60)) + dups[:5]:
            assert (ds.content_hash(i) == ds.content_hash(j)) == \
                (pixel_hash(i) == pixel_hash(j))
    clean = build_dataset("synthetic", split="test", size=16, n=200)
    assert all(clean.source(i) == i for i in range(200))
    assert all(clean.meta(i)["hashtags"] for i in range(200))


def test_class_balance_covers_all_classes():
    ds = SyntheticImages(2000, 8, seed=0, split="test")
    labels = np.array([ds.meta(i)["label"] for i in range(2000)])
    single = labels[labels >= 0]
    assert 0.3 < len(single) / 2000 < 0.5
    assert set(single.tolist()) == set(range(len(COLOURS) * len(SHAPES)))
