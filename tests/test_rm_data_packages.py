"""Datasets from Debian packages: openclipart-svg (rendered once into a cache) and
dataset-fashion-mnist; a missing package names itself and falls back to synthetic data."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from reference_model.data import (FashionMNIST, MissingPackage, OpenClipart, SyntheticImages,
                                  build_dataset)
from reference_model.data import openclipart as oc
from reference_model.data.packages import FASHION_MNIST_DIR, OPENCLIPART_DIR

HAS_OPENCLIPART = OPENCLIPART_DIR.is_dir()
HAS_FASHION = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
try:
    import cairosvg  # noqa: F401
    HAS_CAIROSVG = True
except ImportError:
    HAS_CAIROSVG = False

SVG = b"""<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="40" height="20"
     viewBox="0 0 40 20">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>Red &amp; Box</dc:title>
    <dc:subject><rdf:Bag><rdf:li>box</rdf:li><rdf:li>Red Thing</rdf:li>
      <rdf:li>a, b</rdf:li></rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Somebody</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect x="0" y="0" width="40" height="20" fill="#ff0000"/>
</svg>"""


def test_parse_metadata():
    title, keywords = oc.parse_metadata(SVG, "fallback")
    assert title == "Red & Box"  # the Work's title, not the creator's
    assert keywords == ["box", "red_thing", "a", "b"]
    assert oc.parse_metadata(b"<svg/>", "stem") == ("stem", [])


@pytest.mark.skipif(not HAS_CAIROSVG, reason="cairosvg (PyPI) is not installed")
def test_render_cache_from_a_folder(tmp_path, monkeypatch):
    """A stand-in package folder: two good SVGs (one wide), one corrupt."""
    root = tmp_path / "svg"
    (root / "shapes").mkdir(parents=True)
    (root / "food").mkdir()
    (root / "shapes" / "box.svg").write_bytes(SVG)
    tall = (SVG.replace(b'width="40" height="20"', b'width="20" height="40"')
            .replace(b'viewBox="0 0 40 20"', b'viewBox="0 0 20 40"')
            .replace(b'width="40" height="20" fill', b'width="20" height="40" fill')
            .replace(b"Red &amp; Box", b"Tall"))
    (root / "food" / "tall.svg").write_bytes(tall)
    (root / "food" / "bad.svg").write_bytes(b"<svg><rect width='100%' stroke-opacity='1%'")
    monkeypatch.setenv("XRAY_OPENCLIPART_DIR", str(root))
    with pytest.warns(UserWarning, match="could not be rendered"):
        ds = OpenClipart(16, cache=tmp_path / "cache", workers=1, verbose=True)
    assert len(ds) == 2 and ds.classes == ["food", "shapes"] and len(ds.failed) == 1
    assert ds.failed[0][0] == "food/bad.svg"
    items = {ds[i]["caption"]: ds[i] for i in range(2)}
    box = items["Red & Box"]
    assert box["hashtags"] == ["box", "red_thing", "a", "b"] and box["label"] == 1
    assert box["caption2"] == "clip art of Red & Box"
    img = box["image"]
    assert img.shape == (3, 16, 16)
    # a 2:1 picture fitted into the square: red band in the middle, white above and below
    assert torch.allclose(img[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert torch.allclose(img[:, 1, 8], torch.ones(3), atol=0.02)
    tall = items["Tall"]["image"]
    assert torch.allclose(tall[:, 8, 1], torch.ones(3), atol=0.02)  # white left and right
    # second time: from the cache, nothing rendered
    monkeypatch.setattr(oc, "_render_one", lambda *a: pytest.fail("rendered again"))
    again = OpenClipart(16, cache=tmp_path / "cache", verbose=False)
    assert torch.equal(again[0]["image"], ds[0]["image"])
    assert again.content_hash(0) != again.content_hash(1)


@pytest.mark.skipif(not (HAS_OPENCLIPART and HAS_CAIROSVG),
                    reason="Debian package openclipart-svg or cairosvg not installed "
                    "(apt-get install openclipart-svg; pip install cairosvg)")
def test_openclipart_package(tmp_path):
    ds = build_dataset("openclipart", size=24, n=16, cache=tmp_path, workers=2,
                       fallback=False, split="all")
    assert isinstance(ds, OpenClipart) and len(ds) + len(ds.failed) == 16
    assert len(ds.classes) >= 20  # every top-level folder of the package
    metas = [ds.meta(i) for i in range(len(ds))]
    assert sum(bool(m["hashtags"]) for m in metas) >= len(ds) // 2
    assert all(m["caption"] for m in metas)
    x = ds[0]["image"]
    assert x.shape == (3, 24, 24) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.std()) > 0.01  # something was drawn
    train = OpenClipart(24, split="train", limit=16, cache=tmp_path, verbose=False)
    test = OpenClipart(24, split="test", limit=16, cache=tmp_path, verbose=False)
    assert len(train) + len(test) == len(ds)
    assert not set(train.files) & set(test.files)


def test_missing_package_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAY_OPENCLIPART_DIR", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="apt-get install openclipart-svg.*synthetic"):
        ds = build_dataset("openclipart", size=8, n=10)
    assert isinstance(ds, SyntheticImages) and len(ds) == 10
    with pytest.raises(MissingPackage, match="openclipart-svg"):
        build_dataset("openclipart", size=8, fallback=False)
    monkeypatch.setenv("XRAY_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingPackage, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(8)
    with pytest.warns(UserWarning, match="dataset-fashion-mnist"):
        assert isinstance(build_dataset("fashion-mnist", size=8, n=5), SyntheticImages)


def _idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path, monkeypatch):
    images = np.zeros((3, 28, 28), np.uint8)
    images[1, :, :14] = 255
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    monkeypatch.setenv("XRAY_FASHION_MNIST_DIR", str(tmp_path))
    ds = FashionMNIST(14)
    assert len(ds) == 3 and ds.meta(0)["caption"] == "a photo of a ankle boot"
    assert ds.meta(0)["hashtags"] == ["ankle_boot"] and ds.meta(2)["label"] == 3
    x = ds[1]["image"]  # inverted: the garment dark on white
    assert x.shape == (3, 14, 14)
    assert float(x[:, :, :6].max()) < 0.05 and float(x[:, :, 8:].min()) > 0.95
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte.gz", bad / "t10k-labels-idx1-ubyte.gz")
    with gzip.open(bad / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"short")
    monkeypatch.setenv("XRAY_FASHION_MNIST_DIR", str(bad))
    with pytest.raises(ValueError, match="expected"):
        FashionMNIST(8)


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not "
                    "installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_package():
    ds = build_dataset("fashion-mnist", split="test", size=32, n=200, fallback=False)
    assert isinstance(ds, FashionMNIST) and len(ds) == 200
    labels = [ds.meta(i)["label"] for i in range(200)]
    assert set(labels) == set(range(10))
    assert ds[0]["image"].shape == (3, 32, 32)
