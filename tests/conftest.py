"""Suite-wide setup: the Triton interpreter on CPU-only machines, the `gpu` marker, and the
device/backend/dtype matrices every op test parametrizes over."""

import os

import torch

if not torch.cuda.is_available():
    # Read when @triton.jit runs, i.e. when xray_ops.kernels.* is first imported: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_backend():
    """Every test starts from backend "auto" and a fixed seed."""
    import xray_ops

    xray_ops.set_backend("auto")
    torch.manual_seed(0)
    yield
    xray_ops.set_backend("auto")
