"""Where the packaged datasets live, and the error that names a missing package."""

from __future__ import annotations

import os
from pathlib import Path

OPENCLIPART_DIR = Path("/usr/share/openclipart/svg")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class MissingPackage(RuntimeError):
    """A dataset's package is not installed; the message says how to install it."""

    def __init__(self, dataset: str, package: str, how: str, where: Path | str | None = None):
        self.dataset, self.package, self.how = dataset, package, how
        at = f" (looked in {where})" if where else ""
        super().__init__(f"{dataset}: the package {package} is not installed{at}; "
                         f"install it with `{how}`")


def openclipart_dir() -> Path:
    """The openclipart-svg package's SVG folder (env XRAY_OPENCLIPART_DIR overrides)."""
    d = Path(os.environ.get("XRAY_OPENCLIPART_DIR", OPENCLIPART_DIR))
    if not d.is_dir():
        raise MissingPackage("openclipart", "openclipart-svg (Debian)",
                             "apt-get install openclipart-svg", d)
    return d


def fashion_mnist_dir() -> Path:
    """The dataset-fashion-mnist package's folder (env XRAY_FASHION_MNIST_DIR overrides)."""
    d = Path(os.environ.get("XRAY_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        raise MissingPackage("fashion-mnist", "dataset-fashion-mnist (Debian)",
                             "apt-get install dataset-fashion-mnist", d)
    return d


def cache_dir() -> Path:
    """Where rendered datasets are cached: $XRAY_CACHE_DIR, else ~/.cache/xray_ops."""
    d = os.environ.get("XRAY_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "xray_ops"
