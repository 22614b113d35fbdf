"""User data from files: image folders with captions, webdataset shards, video clip folders;
a corrupt file is skipped and counted, never fatal."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from reference_model.data import (ImageFolderCaptions, UnreadableSample, VideoFolder,
                                  WebDatasetShards, build_dataset, curate, make_loader)


def _png(path, colour, size=(12, 10)):
    Image.new("RGB", size, colour).save(path)


def _png_bytes(colour, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "red.png", (255, 0, 0))
    _png(tmp_path / "imgs" / "green.png", (0, 255, 0))
    _png(tmp_path / "imgs" / "red_again.png", (255, 0, 0))  # same content as red.png
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = _png_bytes((0, 0, 255), (16, 16))
    (tmp_path / "imgs" / "truncated.png").write_bytes(good[:len(good) // 2])
    rows = [("imgs/red.png", "a red square", "#red #square", "red"),
            ("imgs/broken.png", "a broken file", "broken", ""),
            ("imgs/green.png", "a green square", "green, square", "green"),
            ("imgs/truncated.png", "half a file", "", ""),
            ("imgs/missing.png", "no such file", "gone", ""),
            ("imgs/red_again.png", "red once more", "#red", "red")]
    with open(tmp_path / "captions.csv", "w") as f:
        f.write("path,caption,hashtags,label\n")
        for r in rows:
            f.write(",".join(f'"{v}"' for v in r) + "\n")
    return tmp_path


def test_folder_csv_items(image_folder):
    ds = ImageFolderCaptions(image_folder, size=8)
    assert len(ds) == 6 and ds.classes == ["green", "red"]
    it = ds[0]
    assert it["image"].shape == (3, 8, 8) and it["caption"] == "a red square"
    assert it["hashtags"] == ["red", "square"] and it["label"] == 1
    assert torch.allclose(it["image"][:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    assert ds.meta(2)["hashtags"] == ["green", "square"] and ds.meta(1)["label"] == -1
    for bad in (1, 3, 4):
        with pytest.raises(UnreadableSample) as e:
            ds[bad]
        assert e.value.index == bad
    import pickle  # crosses DataLoader worker processes
    e2 = pickle.loads(pickle.dumps(e.value))
    assert (e2.index, e2.reason) == (4, e.value.reason) and "missing.png" in e2.source


def test_corrupt_images_are_skipped_and_counted(image_folder):
    ds = build_dataset(f"folder:{image_folder}", size=8)
    loader = make_loader(ds, 3, shuffle=False, drop_last=False)
    with pytest.warns(UserWarning, match="skipped unreadable"):
        batches = list(loader)
    got = [i for b in batches for i in b["index"].tolist()]
    assert got == [0, 2, 5]
    assert sorted(i for i, _ in loader.skipped) == [1, 3, 4]
    reasons = " ".join(r for _, r in loader.skipped)
    assert "UnidentifiedImageError" in reasons or "cannot identify" in reasons
    assert "FileNotFoundError" in reasons
    assert "3 unreadable items skipped" in loader.report()
    # curation's dedup hashes the files: the copy goes, the unreadable ones are reported
    out, report = curate(ds, min_tag_count=1, max_tags=None)
    assert [out.base_index(i) for i in range(len(out))] == [0, 1, 2, 3]
    assert [i for i, _ in report[0].unreadable] == [4]
    assert "1 exact duplicates" in report[0].line()


def test_folder_jsonl_and_imagefolder_layout(tmp_path):
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "x.png", (10, 20, 30))
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.write(json.dumps({"path": "a/x.png", "caption": "c", "caption2": "d",
                            "hashtags": ["#One", "two words"], "label": 3}) + "\n")
    ds = ImageFolderCaptions(tmp_path, size=4)
    it = ds[0]
    assert (it["caption"], it["caption2"], it["hashtags"], it["label"]) == \
        ("c", "d", ["one", "two_words"], 3)
    root = tmp_path / "classes"
    for cls in ("cat", "dog_house"):
        (root / cls).mkdir(parents=True)
        _png(root / cls / "1.png", (0, 0, 0))
    ds = ImageFolderCaptions(root, size=4)
    assert ds.classes == ["cat", "dog house"]
    assert [ds.meta(i)["caption"] for i in range(2)] == ["a photo of a cat",
                                                        "a photo of a dog house"]
    assert [ds.meta(i)["label"] for i in range(2)] == [0, 1]
    with pytest.raises(FileNotFoundError):
        ImageFolderCaptions(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no samples"):
        ImageFolderCaptions(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        ImageFolderCaptions(tmp_path, captions=bad)


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for k in range(3):
                key = f"s{s}_{k:02d}"
                sample = {"__key__": key, "png": _png_bytes((80 * k, 0, 0)),
                          "txt": f"sample {s} {k}",
                          "json": json.dumps({"hashtags": ["a", f"k{k}"], "label": "cat"})}
                if s == 1 and k == 1:
                    sample["png"] = b"corrupt bytes"
                w.write(sample)
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), size=8)
    assert len(ds) == 6 and ds.classes == ["cat"]
    it = ds[1]
    assert it["caption"] == "sample 0 1" and it["hashtags"] == ["a", "k1"]
    assert it["image"].shape == (3, 8, 8) and it["label"] == 0
    assert abs(float(it["image"][0].mean()) - 80 / 255) < 0.01
    with pytest.raises(UnreadableSample):
        ds[4]
    loader = make_loader(ds, 6, shuffle=False)
    with pytest.warns(UserWarning):
        (batch,) = list(loader)
    assert batch["index"].tolist() == [0, 1, 2, 3, 5] and len(loader.skipped) == 1
    # a truncated shard: its readable samples are kept, the shard is reported
    data = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "a.tar").write_bytes((tmp_path / "shard-000.tar").read_bytes())
    (tmp_path / "cut" / "b.tar").write_bytes(data[:1700])
    with pytest.warns(UserWarning, match="unreadable shard"):
        cut = build_dataset(f"webdataset:{tmp_path / 'cut'}", size=8)
    assert 3 <= len(cut) < 6 and len(cut.unreadable_shards) == 1
    with pytest.raises(ValueError, match="uncompressed"):
        WebDatasetShards(str(tmp_path / "x.tar.gz"))


def test_webdataset_random_access_matches_tarfile(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for k in range(5):
            w.write({"__key__": f"{k:04d}", "jpg": _png_bytes((k * 50, 255 - k * 50, 7)),
                     "txt": f"t{k}"})
    ds = WebDatasetShards(str(tmp_path / "s.tar"), size=8)
    with tarfile.open(tmp_path / "s.tar") as tar:
        for k in range(5):
            raw = tar.extractfile(f"{k:04d}.jpg").read()
            assert ds._bytes(k) == raw


def test_video_folder(tmp_path):
    for c, n in (("walk", 5), ("run", 3)):
        clip = tmp_path / c / "clip1"
        clip.mkdir(parents=True)
        for t in range(n):
            _png(clip / f"{t:03d}.png", (t * 40, 0, 0), (16, 16))
    (tmp_path / "walk" / "broken").mkdir()
    (tmp_path / "walk" / "broken" / "000.png").write_bytes(b"garbage")
    ds = VideoFolder(tmp_path, size=8, frames=4)
    assert ds.kind == "video" and ds.classes == ["run", "walk"] and len(ds) == 3
    it = ds[0]  # run/clip1: 3 frames spread over 4
    assert it["video"].shape == (3, 4, 8, 8) and it["label"] == 0
    reds = it["video"][0, :, 4, 4] * 255
    assert torch.allclose(reds, torch.tensor([0.0, 40.0, 40.0, 80.0]), atol=1.5)
    assert ds[2]["video"].shape == (3, 4, 8, 8)
    with pytest.raises(UnreadableSample):
        ds[1]
    mp4 = tmp_path / "mp4s"
    mp4.mkdir()
    (mp4 / "a.mp4").write_bytes(b"not a video")
    from reference_model.data.decode import has_video_decoder
    if not has_video_decoder():
        with pytest.warns(UserWarning, match="pip install av"):
            vf = VideoFolder(mp4, size=8, frames=2)
    else:
        vf = VideoFolder(mp4, size=8, frames=2)
    with pytest.raises(UnreadableSample):
        vf[0]


def test_decode_fit_keeps_aspect_and_alpha():
    from reference_model.data.decode import load_image

    img = Image.new("RGBA", (20, 10), (0, 0, 255, 0))  # transparent: composited on white
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = load_image(buf.getvalue(), 6)
    assert x.shape == (3, 6, 6) and torch.allclose(x, torch.ones_like(x))
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 10:] = 255  # left half black, right half white: centre crop keeps both
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    y = load_image(buf.getvalue(), 10)
    assert float(y[:, :, 0].mean()) < 0.1 and float(y[:, :, -1].mean()) > 0.9
