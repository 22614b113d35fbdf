"""A real task for int8 accuracy: a small ViT trained on the CPU, float vs ``quantize_``'d.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` when it is installed
(idx-ubyte.gz files; a class-balanced subset keeps training short), else scikit-learn's
``load_digits`` (1,797 8x8 digits, 10 classes; shipped inside scikit-learn). Nothing is
downloaded and nothing is cached across runs: every call trains from scratch, from a seed.

Used by tests/test_int8_models.py (top-1 lost < 1 point) and ``python -m bench int8_accuracy``
(the exact figures).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import gzip
import math
import os
import time

import numpy as np
import torch

FASHION_GLOBS = ("/usr/share/dataset-fashion-mnist/**/*ubyte.gz",
                 "/usr/share/fashion-mnist/**/*ubyte.gz", "/usr/share/**/fashion*/**/*ubyte.gz")


@dataclasses.dataclass
class Data:
    name: str
    x_train: torch.Tensor  # (n, 1, H, W) float32, standardized
    y_train: torch.Tensor  # (n,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_files() -> dict[str, str] | None:
    files: list[str] = []
    for pattern in FASHION_GLOBS:
        files += glob.glob(pattern, recursive=True)
    found = {}
    for key, stem in (("xtr", "train-images"), ("ytr", "train-labels"),
                      ("xte", "t10k-images"), ("yte", "t10k-labels")):
        match = [f for f in files if os.path.basename(f).startswith(stem)]
        if not match:
            return None
        found[key] = sorted(match)[0]
    return found


def _balanced(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return rng.permutation(np.concatenate(idx))


def load_data(seed: int = 0, fashion_train_per_class: int = 300,
              fashion_test_per_class: int = 100) -> Data:
    """Fashion-MNIST (subset) when the Debian package is installed, else sklearn's digits."""
    rng = np.random.default_rng(seed)
    files = _fashion_files()
    if files is not None:
        xtr, ytr = _read_idx(files["xtr"]), _read_idx(files["ytr"]).astype(np.int64)
        xte, yte = _read_idx(files["xte"]), _read_idx(files["yte"]).astype(np.int64)
        itr = _balanced(ytr, fashion_train_per_class, rng)
        ite = _balanced(yte, fashion_test_per_class, rng)
        xtr, ytr, xte, yte = xtr[itr], ytr[itr], xte[ite], yte[ite]
        name = f"fashion-mnist ({len(ytr)} train / {len(yte)} test, 28x28)"
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        perm = rng.permutation(len(d.target))
        n_test = len(perm) // 5
        x, y = d.images.astype(np.float32), d.target.astype(np.int64)
        xte, yte, xtr, ytr = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
        name = f"sklearn digits ({len(ytr)} train / {len(yte)} test, 8x8; " \
               f"dataset-fashion-mnist not installed)"
    xtr = torch.tensor(xtr, dtype=torch.float32)[:, None]
    xte = torch.tensor(xte, dtype=torch.float32)[:, None]
    mean, std = xtr.mean(), xtr.std()
    return Data(name, (xtr - mean) / std, torch.tensor(ytr), (xte - mean) / std, torch.tensor(yte))


def make_model(data: Data, embed_dim: int = 64, depth: int = 3, num_heads: int = 4):
    """A small timm ViT for the data's image size (patch 2 for 8x8 digits, 4 for 28x28)."""
    from timm.models.vision_transformer import VisionTransformer

    size = data.x_train.shape[-1]
    return VisionTransformer(img_size=size, patch_size=2 if size <= 8 else 4, in_chans=1,
                             num_classes=10, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=2.0)


def train(model: torch.nn.Module, data: Data, epochs: int = 30, batch: int = 64,
          lr: float = 2e-3, seed: int = 0) -> torch.nn.Module:
    """AdamW + cosine schedule with warm-up and label smoothing (digits: ~96% top-1 in ~15 s
    on one core)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    n = len(data.y_train)
    steps = epochs * math.ceil(n / batch)
    warm = max(1, steps // 20)
    def lr_at(s):
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            x = data.x_train[idx]
            loss = torch.nn.functional.cross_entropy(model(x), data.y_train[idx],
                                                     label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return correct / len(y)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Pre-logits embeddings (the CLS token after the final norm)."""
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
                      for i in range(0, len(x), batch)])


def keep_head_float(module: torch.nn.Module, name: str) -> bool:
    """quantize_ filter: every Linear but the classifier head."""
    return name != "head"


@dataclasses.dataclass
class AccuracyReport:
    data: str
    n_test: int
    float_top1: float
    int8_top1: float
    int8_all_top1: float  # the head quantized too
    train_s: float

    @property
    def lost_points(self) -> float:
        return 100.0 * (self.float_top1 - self.int8_top1)


# (Fashion-MNIST train images per class, epochs): the benchmark's run, and the test's shorter one
FULL = (300, 30)
QUICK = (100, 20)


def run(seed: int = 0, epochs: int | None = None, threads: int | None = None,
        quick: bool = False, **model_kw):
    """Train from scratch, quantize_, evaluate. Returns (report, float model, int8 model, data).

    quick: a shorter run for the test suite (Fashion-MNIST: 1,000 training images, 20 epochs;
    digits: unchanged, ~15 s on one core).
    """
    import xray_ops as xo

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    per_class, fashion_epochs = QUICK if quick else FULL
    data = load_data(seed, fashion_train_per_class=per_class)
    if epochs is None:
        epochs = fashion_epochs if data.name.startswith("fashion") else 30
    model = make_model(data, **model_kw)
    t0 = time.perf_counter()
    train(model, data, epochs=epochs, seed=seed)
    train_s = time.perf_counter() - t0
    f_acc = top1(model, data.x_test, data.y_test)
    q_model = xo.quantize_(copy.deepcopy(model), filter_fn=keep_head_float)
    q_acc = top1(q_model, data.x_test, data.y_test)
    q_all = xo.quantize_(copy.deepcopy(model))
    q_all_acc = top1(q_all, data.x_test, data.y_test)
    report = AccuracyReport(data.name, len(data.y_test), f_acc, q_acc, q_all_acc, train_s)
    return report, model, q_model, data
